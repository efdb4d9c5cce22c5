"""The preallocated cache: index writes and moves, and equality with a fresh prefill after decoding."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from engine.decode import Engine
from engine.kv_cache import KVCache
from engine.messages import Request
from engine.tree import preset


def test_writer_and_move():
    cache = KVCache(num_layers=2, slots=3, kv_heads=1, capacity=8, head_dim=1, dtype=torch.float32, device="cpu")
    positions = torch.tensor([[2, 3, 4], [0, 1, 2]])  # slot 1 starts at 2, slot 2 at 0
    writer = cache.writer(slice(1, 3), positions, kv_len=5)
    new = torch.tensor([[1.0, 2, 3], [4, 5, 6]]).view(2, 1, 3, 1)  # [B, H, T, Dh]
    keys, values = writer.update(new, -new, layer_idx=1)
    assert keys.shape == (2, 1, 5, 1)
    assert cache.k[1, :, 0, :, 0].tolist() == [[0] * 8, [0, 0, 1, 2, 3, 0, 0, 0], [4, 5, 6, 0, 0, 0, 0, 0]]
    assert cache.v[1, 2, 0, :3, 0].tolist() == [-4, -5, -6]
    assert cache.k[0].abs().sum() == 0  # other layers untouched
    # accept node 2 after node 0 in slot 1 (positions 2 -> 2, 4 -> 3), nodes 1 in slot 2 (1 -> 1)
    cache.move(slice(1, 3), src=torch.tensor([[2, 4], [0, 1]]), dst=torch.tensor([[2, 3], [0, 1]]))
    assert cache.k[1, 1, 0, :5, 0].tolist() == [0, 0, 1, 3, 3]
    assert cache.v[1, 1, 0, :5, 0].tolist() == [0, 0, -1, -3, -3]
    cache.copy_slot(src=2, dst=0, length=2)
    assert cache.k[1, 0, 0, :3, 0].tolist() == [4, 5, 0]


def test_cache_equals_a_fresh_prefill_after_many_steps(toy, prompts):
    model, tokenizer = toy
    engine = Engine(model, tokenizer, tree=preset("mc_sim_7b_63"), max_batch_size=4)
    batch = engine.new_batch()
    engine.admit(batch, [Request(str(i), p, max_new_tokens=150) for i, p in enumerate(prompts[:4])])
    accepted = set()
    for _ in range(12):
        accepted |= {e.accepted for e in engine.step(batch)}
    assert len(accepted) >= 3  # acceptance varied from step to step
    assert not any(s.done for s in batch.seqs)
    for slot, seq in enumerate(batch.seqs):
        tokens = seq.request.prompt_ids + seq.tokens[:-1]  # the last token is the next root: not cached yet
        length = int(batch.lengths[slot])
        assert length == len(tokens)
        fresh = DynamicCache(config=model.config)
        with torch.no_grad():
            model.model(torch.tensor([tokens]), cache=fresh, use_cache=True)
        for layer in range(model.config.num_hidden_layers):
            torch.testing.assert_close(batch.cache.k[layer, slot, :, :length], fresh.layers[layer].keys[0])
            torch.testing.assert_close(batch.cache.v[layer, slot, :, :length], fresh.layers[layer].values[0])
