"""End-to-end engine behaviour on the toy model: speculative greedy output equals Hugging Face
greedy output token for token, in every batch shape and tree, with stops inside accepted chunks."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.decode import Engine
from engine.kv_cache import KVCache
from engine.messages import Request
from engine.tree import PRESETS, preset
from medusa_model import HeadsConfig, MedusaHeads, MedusaModel

DEFAULT_TREE = "tree15"
NEW = 40


def make_engine(toy, tree=DEFAULT_TREE, batch=8, **kw) -> Engine:
    model, tokenizer = toy
    return Engine(model, tokenizer, tree=preset(tree), max_batch_size=batch, **kw)


def requests(prompts, max_new_tokens=NEW, **kw) -> list[Request]:
    return [Request(str(i), p, max_new_tokens=max_new_tokens, **kw) for i, p in enumerate(prompts)]


def assert_parity(results, prompts, hf_greedy, max_new_tokens=NEW):
    for seq, prompt in zip(results, prompts):
        assert seq.tokens == hf_greedy(prompt, max_new_tokens), f"request {seq.request.id}"


def tokens_per_step(results) -> float:
    return sum(s.decode_tokens for s in results) / sum(s.decode_steps for s in results)


def test_trained_heads_are_accepted(toy, prompts):
    results = make_engine(toy).generate(requests(prompts, 64))
    assert tokens_per_step(results) >= 1.8


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_parity_with_hf_greedy(toy, prompts, hf_greedy, batch):
    """B=3 admits the later requests into a running batch as earlier ones finish."""
    results = make_engine(toy, batch=batch).generate(requests(prompts))
    assert_parity(results, prompts, hf_greedy)


@pytest.mark.parametrize("tree", sorted(PRESETS))
def test_parity_every_tree_preset(toy, prompts, hf_greedy, tree):
    results = make_engine(toy, tree=tree, batch=3).generate(requests(prompts))
    assert_parity(results, prompts, hf_greedy)
    if tree == "root":
        assert all(s.accepted_tokens_per_step == 1.0 for s in results)


def test_admission_into_a_running_batch(toy, prompts, hf_greedy):
    """Requests of different lengths join mid-way; their neighbours are not disturbed."""
    engine = make_engine(toy, batch=4)
    batch = engine.new_batch()
    lengths = [30, 7, 19, 40, 12, 25, 3, 35]
    reqs = [Request(str(i), p, max_new_tokens=n) for i, (p, n) in enumerate(zip(prompts, lengths))]
    engine.admit(batch, reqs[:2])
    for _ in range(3):
        engine.step(batch)
    done, waiting = [], reqs[2:]
    while waiting or batch.seqs:
        arrivals, waiting = waiting[: engine.free_slots(batch)], waiting[engine.free_slots(batch) :]
        engine.admit(batch, arrivals)
        done += engine.filter(batch)
        if batch.seqs:
            engine.step(batch)
            done += engine.filter(batch)
    assert len(done) == len(reqs)
    for seq in done:
        i = int(seq.request.id)
        assert seq.tokens == hf_greedy(prompts[i], lengths[i])
        assert seq.finish_reason == "length"


def test_standard_and_speculative_share_a_step(toy, prompts, hf_greedy):
    reqs = [Request(str(i), p, max_new_tokens=NEW, speculative=i % 2 == 0) for i, p in enumerate(prompts)]
    results = make_engine(toy, tree="mc_sim_7b_63").generate(reqs)
    assert_parity(results, prompts, hf_greedy)
    assert all(s.accepted_tokens_per_step == 1.0 for s in results[1::2])
    assert tokens_per_step(results[::2]) > 1.5


def test_standard_decoding_never_runs_the_heads(toy, prompts, hf_greedy, monkeypatch):
    """A benchmark of standard against speculative decoding must not charge the heads to standard."""
    model, _ = toy
    calls = []
    monkeypatch.setattr(model, "head_logits", lambda hidden: calls.append(hidden))
    results = make_engine(toy).generate(requests(prompts, speculative=False))
    assert_parity(results, prompts, hf_greedy)
    assert calls == []


def test_a_shallow_tree_drafts_with_the_heads_it_uses_only(toy, prompts, hf_greedy, monkeypatch):
    """A tree shallower than the heads asks for its depth of heads and its ranks, and stays exact."""
    model, _ = toy
    calls, real = [], model.head_topk
    monkeypatch.setattr(model, "head_topk", lambda hidden, k, roots=None, count=None:
                        calls.append((k, count)) or real(hidden, k, roots, count))
    assert model.num_heads > 2
    assert_parity(make_engine(toy, tree="chain2").generate(requests(prompts)), prompts, hf_greedy)
    assert calls and set(calls) == {(1, 2)}


@pytest.mark.parametrize("tree, moves", [("chain3", False), ("tree15", True)])
def test_a_chains_accepted_nodes_stay_where_they_were_written(toy, prompts, hf_greedy, monkeypatch, tree, moves):
    """A chain's node j sits at cache row length + j, where its accepted path keeps it: the step moves
    no K/V; a branching tree moves its accepted path's rows next to the prefix. Both stay exact."""
    calls = []
    real = KVCache.move
    monkeypatch.setattr(KVCache, "move", lambda self, *a: calls.append(1) or real(self, *a))
    results = make_engine(toy, tree=tree).generate(requests(prompts))
    assert_parity(results, prompts, hf_greedy)
    assert tokens_per_step(results) > 1.2 and bool(calls) == moves


def test_max_new_tokens_one(toy, prompts, hf_greedy):
    results = make_engine(toy).generate(requests(prompts, 1))
    assert_parity(results, prompts, hf_greedy, 1)
    assert all(s.decode_steps == 0 and s.finish_reason == "length" for s in results)


def chunks(toy, prompt):
    """The token chunks a speculative run emits for one prompt: [first token], then one per step."""
    return [e.token_ids for e in make_engine(toy, batch=1).generate_stream(requests([prompt]))]


def mid_chunk_token(toy, prompts):
    """(prompt, token) where the token's first occurrence is inside a chunk, not at its end."""
    for prompt in prompts:
        seen = set()
        for chunk in chunks(toy, prompt):
            for j, token in enumerate(chunk):
                if token not in seen and 0 < j < len(chunk) - 1:
                    return prompt, token
                seen.add(token)
    raise AssertionError("no multi-token chunk with a fresh token")


def test_eos_inside_an_accepted_chunk(toy, prompts, hf_greedy):
    prompt, eos = mid_chunk_token(toy, prompts)
    expected = hf_greedy(prompt, NEW, eos)
    assert len(expected) < NEW - 1
    events = list(make_engine(toy, batch=1, eos_token_ids=[eos]).generate_stream(requests([prompt])))
    tokens = [t for e in events for t in e.token_ids]
    assert tokens == expected
    assert events[-1].finish_reason == "stop"
    assert events[-1].accepted > len(events[-1].token_ids) + 1  # tokens after EOS were verified, then dropped


def two_char_stop(toy, prompts, inside_chunk: bool):
    """(prompt, stop): a 2-character stop string across a token boundary, found first there.
    inside_chunk: between two tokens of one accepted chunk, with more tokens after it;
    else across the boundary between two chunks (the first chunk's tail must be held back)."""
    _, tokenizer = toy
    for prompt in prompts:
        cs = chunks(toy, prompt)
        tokens = [t for c in cs for t in c]
        text = tokenizer.decode(tokens)
        offsets = [len(tokenizer.decode(tokens[:k])) for k in range(len(tokens) + 1)]
        start = 0
        for c in cs:
            bounds = range(start + 1, start + len(c) - 1) if inside_chunk else [start + len(c)]
            for b in bounds:
                if 0 < b < len(tokens) and offsets[b - 1] < offsets[b] < offsets[b + 1]:
                    stop = text[offsets[b] - 1 : offsets[b] + 1]
                    if "\ufffd" not in stop and text.find(stop) == offsets[b] - 1:
                        return prompt, stop
            start += len(c)
    raise AssertionError("no suitable token boundary")


@pytest.mark.parametrize("inside_chunk", [True, False], ids=["inside-chunk", "across-chunks"])
def test_stop_string_cuts_the_text(toy, prompts, hf_greedy, inside_chunk):
    _, tokenizer = toy
    prompt, stop = two_char_stop(toy, prompts, inside_chunk)
    events = list(make_engine(toy, batch=1).generate_stream(requests([prompt], stop=(stop,))))
    reference = tokenizer.decode(hf_greedy(prompt, NEW))
    assert "".join(e.text for e in events) == reference[: reference.index(stop)]
    assert events[-1].finish_reason == "stop"
    if inside_chunk:
        assert events[-1].accepted > len(events[-1].token_ids)  # verified tokens after the stop are dropped


def test_stream_deltas_add_up_to_the_text(toy, prompts):
    model, tokenizer = toy
    engine = make_engine(toy, batch=4)
    events = list(engine.generate_stream(requests(prompts)))
    for i, prompt in enumerate(prompts):
        mine = [e for e in events if e.request_id == str(i)]
        tokens = [t for e in mine for t in e.token_ids]
        assert "".join(e.text for e in mine) == tokenizer.decode(tokens, skip_special_tokens=True)
        assert [e.finish_reason for e in mine][-1] == "length"
        assert all(e.finish_reason is None for e in mine[:-1])


def test_cancelled_sequence_leaves_the_batch(toy, prompts, hf_greedy):
    engine = make_engine(toy, batch=4)
    batch = engine.new_batch()
    engine.admit(batch, requests(prompts[:4]))
    engine.step(batch)
    batch.cancel("1")
    done = engine.filter(batch)
    assert [s.request.id for s in done] == ["1"] and done[0].finish_reason == "cancelled"
    assert [s.request.id for s in batch.seqs] == ["0", "2", "3"]
    finished = []
    while batch.seqs:
        engine.step(batch)
        finished += engine.filter(batch)
    for seq in finished:
        assert seq.tokens == hf_greedy(prompts[int(seq.request.id)], NEW)


def test_request_that_does_not_fit_is_refused(toy, prompts):
    engine = make_engine(toy)
    with pytest.raises(ValueError, match="must fit"):
        engine.admit(engine.new_batch(), [Request("x", prompts[0], max_new_tokens=engine.max_context)])


@pytest.mark.parametrize("reads_root", [False, True], ids=["plain", "reading-the-root-token"])
def test_parity_with_version_2_heads(toy, prompts, hf_greedy, reads_root):
    """Heads that reuse the base lm_head ("version 2" layout), and heads that read the root token,
    go through the same step."""
    model, tokenizer = toy
    cfg = model.config
    torch.manual_seed(0)
    config = HeadsConfig(4, 1, shares_lm_head=True, reads_root_token=reads_root)
    heads = MedusaHeads(config, cfg.hidden_size, cfg.vocab_size)
    for block in heads.parameters():
        block.data.normal_(std=0.05)
    engine = Engine(MedusaModel(model.model, heads.eval()), tokenizer, tree=preset("tree15"), max_batch_size=3)
    assert_parity(engine.generate(requests(prompts)), prompts, hf_greedy)


def test_tree_deeper_than_the_heads_is_refused(toy):
    model, tokenizer = toy
    cfg = model.config
    two_heads = MedusaModel(model.model, MedusaHeads(HeadsConfig(2), cfg.hidden_size, cfg.vocab_size))
    with pytest.raises(ValueError, match="4 deep but the model has 2 heads"):
        Engine(two_heads, tokenizer, tree=preset("chain4"))


def test_parity_with_eager_attention(toy, prompts, hf_greedy):
    """The additive 4-D mask works with HF's eager attention too, not only with sdpa."""
    model, tokenizer = toy
    base = copy.deepcopy(model.model)
    base.set_attn_implementation("eager")
    assert base.config._attn_implementation == "eager"
    results = Engine(MedusaModel(base, model.heads), tokenizer, tree=preset("tree15"), max_batch_size=3).generate(
        requests(prompts)
    )
    assert_parity(results, prompts, hf_greedy)


def test_logprobs_are_those_of_the_base_model_at_each_emitted_token(toy, prompts):
    model, tokenizer = toy
    engine = Engine(model, tokenizer, tree=preset("tree15"), max_batch_size=2)
    asked = Request("a", prompts[1], max_new_tokens=12, ignore_eos=True, logprobs=3)
    events = list(engine.generate_stream([asked, Request("b", prompts[2], max_new_tokens=12)]))
    tokens = [t for e in events if e.request_id == "a" for t in e.token_ids]
    logprobs = [lp for e in events if e.request_id == "a" for lp in e.logprobs]
    assert all(e.logprobs is None for e in events if e.request_id == "b")
    full = torch.tensor([prompts[1] + tokens])
    with torch.no_grad():
        ref = torch.log_softmax(model.model(full).logits[0, len(prompts[1]) - 1 : -1], -1)  # [12, V]
    assert len(logprobs) == len(tokens) == 12
    for j, (chosen, top) in enumerate(logprobs):
        assert chosen == pytest.approx(ref[j, tokens[j]].item(), abs=1e-4)
        assert [t for t, _ in top] == ref[j].topk(3).indices.tolist()
        assert top[0][0] == tokens[j]  # greedy: the chosen token is the most likely one


def test_prompt_logprobs_score_every_prompt_token_after_the_first(toy, prompts):
    model, tokenizer = toy
    engine = Engine(model, tokenizer, tree=preset("tree7"), max_batch_size=2)
    scored = Request("a", prompts[3], max_new_tokens=4, logprobs=2, score_prompt=True)
    events = list(engine.generate_stream([scored, Request("b", prompts[1], max_new_tokens=4)]))
    first = next(e for e in events if e.request_id == "a")
    assert all(e.prompt_logprobs is None for e in events if e is not first)
    with torch.no_grad():
        ref = torch.log_softmax(model.model(torch.tensor([prompts[3]])).logits[0], -1)  # [P, V]
    assert len(first.prompt_logprobs) == len(prompts[3]) - 1
    for j, (chosen, top) in enumerate(first.prompt_logprobs):
        assert chosen == pytest.approx(ref[j, prompts[3][j + 1]].item(), abs=1e-4)
        assert [t for t, _ in top] == ref[j].topk(2).indices.tolist()
    unscored = engine.generate([Request("c", prompts[3], max_new_tokens=4)])[0]
    assert [t for e in events if e.request_id == "a" for t in e.token_ids] == unscored.tokens
