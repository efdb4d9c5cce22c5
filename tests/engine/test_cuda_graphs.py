"""Static step shapes (buckets, padding rows) on every device, and the CUDA-graph replay where CUDA is.

The CUDA tests need no conftest (the GPU machine has no web stack): there,
`python -m pytest --noconftest tests/engine/test_cuda_graphs.py`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.cuda_graphs import batch_bucket, kv_bucket
from engine.decode import Engine
from engine.messages import Request
from engine.tree import ROOT
from load_medusa_from_hf import heads_tree, load_medusa_model

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "models" / "pycoder-4m"


def test_buckets():
    assert [batch_bucket(n, 64) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 64)] == [1, 2, 4, 4, 8, 8, 16, 16, 24, 64]
    assert batch_bucket(5, 6) == 6  # never more rows than the cache has slots
    assert [kv_bucket(n, 1000) for n in (1, 128, 129, 999)] == [128, 128, 256, 1000]


def decode(engine: Engine, prompts: list[list[int]], new: int):
    """Greedy, all prompts in one batch; returns (tokens per prompt, the batch)."""
    batch = engine.new_batch()
    engine.admit(batch, [Request(str(i), p, new) for i, p in enumerate(prompts)])
    seqs = list(batch.seqs)
    while batch.seqs:
        engine.step(batch)
        engine.filter(batch)
    return [s.tokens for s in seqs], batch


def bundled(device: str, dtype: torch.dtype, count: int):
    model, tokenizer = load_medusa_model(str(BUNDLED), str(BUNDLED / "medusa"), device=device, dtype=dtype,
                                         deepspeed=False)
    texts = json.loads((REPO / "benchmark_prompts.json").read_text())["prompts"][:count]
    return model, tokenizer, heads_tree(str(BUNDLED / "medusa")), [tokenizer(t)["input_ids"] for t in texts]


def test_padding_rows_change_no_running_sequence():
    """3 sequences run with 4 rows (one a padding row); each decodes as it does alone, with 1 row."""
    model, tokenizer, tree, prompts = bundled("cpu", torch.float32, 3)
    together, _ = decode(Engine(model, tokenizer, tree=tree, max_batch_size=8, eos_token_ids=[]), prompts, 24)
    alone = [decode(Engine(model, tokenizer, tree=tree, max_batch_size=1, eos_token_ids=[]), [p], 24)[0][0]
             for p in prompts]
    assert together == alone


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none; run it on the device)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graph_replays_decode_what_eager_steps_decode(dtype):
    model, tokenizer, tree, prompts = bundled("cuda", dtype, 5)  # 5 sequences: 8 rows, 3 of them padding
    out = {}
    for graphs in (False, True):
        for t in (tree, None):
            engine = Engine(model, tokenizer, tree=t or ROOT, max_batch_size=8,
                            eos_token_ids=[], cuda_graphs=graphs)
            out[graphs, t is None], batch = decode(engine, prompts, 64)
            assert (batch.graphs is not None and len(batch.graphs) > 0) == graphs
    assert out[True, False] == out[False, False] and out[True, True] == out[False, True]
    if dtype == torch.float32:
        assert out[True, False] == out[True, True]  # speculative == standard, through the graphs
