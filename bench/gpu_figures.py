"""The GPU figures, in one run of a few minutes on one CUDA card: what a decode and a verify step of a
7B-shaped model cost in the service's own engine, against Hugging Face `generate()` and the card's
weight-read floor, and whether speculative greedy decoding stays exact on the GPU.

    python -m bench.gpu_figures --out DIR                 # on the GPU (see docs/gpu.md)
    python -m bench.gpu_figures --tiny --device cpu --out DIR   # the same code on a toy shape (tests)

Each section writes its figures to DIR/gpu_figures.json as soon as it ends, so a run cut short keeps
what it measured. The 7B shape is Vicuna-7B's (Llama: hidden 4096, 32 layers, MLP 11008, vocabulary
32,000) with random fp16 weights and five random Medusa heads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from bench.bench_engine import engine_generate, hf_generate, step_times
from engine.decode import Engine
from engine.kv_cache import KVCache
from engine.messages import Request
from engine.tree import preset
from load_medusa_from_hf import heads_tree, load_medusa_model
from medusa_model import HeadsConfig, MedusaHeads, MedusaModel, wrap_with_deepspeed

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_MODEL = ROOT / "models" / "pycoder-4m"  # not settings.BUNDLED_MODEL: pydantic-settings is not on the GPU machine
SHAPE_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=1024)
SHAPE_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=512, max_position_embeddings=1024)
TREES = ("root", "tree15", "mc_sim_7b_63")  # 1, 16 and 64 tokens verified per sequence


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def numbered_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A tokenizer whose token i is the word `t{i}`: random weights need no real vocabulary, but the
    engine detokenises what it emits."""
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")


def random_medusa(shape: dict, device: str, dtype: torch.dtype, deepspeed: bool) -> MedusaModel:
    torch.manual_seed(0)
    config = LlamaConfig(**shape, torch_dtype=dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
        heads = MedusaHeads(HeadsConfig(num_heads=5), shape["hidden_size"], shape["vocab_size"]).eval()
    torch.set_default_dtype(previous)
    heads.init_lm_heads(model.lm_head)
    return MedusaModel(model, heads, wrap_with_deepspeed(model, dtype) if deepspeed else None)


def copy_bandwidth(device: str, gib: float) -> float:
    """Bytes moved per second (read + written) by a device-to-device copy: median of 10."""
    n = int(gib * 2**30) // 2
    a, b = torch.empty(n, dtype=torch.float16, device=device), torch.empty(n, dtype=torch.float16, device=device)
    times = []
    for _ in range(13):
        sync(device)
        start = time.perf_counter()
        b.copy_(a)
        sync(device)
        times.append(time.perf_counter() - start)
    del a, b
    return 2 * n * 2 / statistics.median(times[3:])


def engine_tokens_per_s(model: MedusaModel, tokenizer, batch: int, prompt_len: int, new: int, tree) -> float:
    """Output tokens/s of `batch` random prompts decoded together to `new` tokens (greedy, EOS ignored),
    in steady state as in the server: one batch (one KV cache, its CUDA graphs) for a warm-up round of
    the same shapes and the timed round."""
    engine = Engine(model, tokenizer, tree=preset(tree) if isinstance(tree, str) else tree, max_batch_size=batch,
                    eos_token_ids=[])
    state = engine.new_batch()
    g = torch.Generator().manual_seed(batch)

    def run(tag: str) -> None:
        prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g).tolist()
        engine.admit(state, [Request(f"{tag}{i}", p, new, ignore_eos=True) for i, p in enumerate(prompts)])
        while state.seqs:
            engine.step(state)
            engine.filter(state)

    run("warm-up ")
    sync(str(model.device))
    start = time.perf_counter()
    run("")
    sync(str(model.device))
    return batch * new / (time.perf_counter() - start)


def hf_generate_tokens_per_s(model: LlamaForCausalLM, prompt_len: int, new: int, static: bool) -> dict:
    """HF generate() at batch 1, greedy, `new` tokens: eager with its dynamic cache, or with a static
    cache and the forward compiled (mode reduce-overhead: CUDA graphs), compile time reported apart."""
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=model.device)
    kwargs = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                  attention_mask=torch.ones_like(ids))
    if static:  # generate() compiles the decoding forward itself when the cache is static
        kwargs["cache_implementation"] = "static"
    sync(str(model.device))
    start = time.perf_counter()
    model.generate(ids, **kwargs)  # the first call compiles
    sync(str(model.device))
    first = time.perf_counter() - start
    times = []
    for _ in range(2):
        start = time.perf_counter()
        model.generate(ids, **kwargs)
        sync(str(model.device))
        times.append(time.perf_counter() - start)
    return {"tokens_per_s": new / min(times), "first_call_s": first}


def static_forward(model: MedusaModel, batch: int, tokens: int, kv_len: int, prompt_len: int, steps: int) -> dict:
    """The verify forward with static shapes: a fixed key length, the mask, positions and cache rows
    as tensors, no host synchronisation. Median ms of an eager call and, on CUDA, of a replay of it
    captured as one CUDA graph, with the largest difference between their logits."""
    dev, cfg = model.device, model.config
    cuda = dev.type == "cuda"
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    cache = KVCache(cfg.num_hidden_layers, batch, model.kv_heads, kv_len, head_dim, model.dtype, dev)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (batch, tokens), generator=g).to(dev)
    write = prompt_len + torch.arange(tokens, device=dev).expand(batch, tokens)  # [B, T] after the prompt
    visible = torch.arange(kv_len, device=dev)[None, None, :] <= write[:, :, None]  # [B, T, S]: a chain
    mask = torch.zeros(batch, 1, tokens, kv_len, dtype=model.dtype, device=dev)
    mask.masked_fill_(~visible[:, None], torch.finfo(mask.dtype).min)
    writer = cache.writer(slice(0, batch), write, kv_len)

    def forward() -> torch.Tensor:
        return model.forward(ids, attention_mask=mask, position_ids=write, cache=writer)[0]

    def median_ms(run) -> float:
        times = []
        for _ in range(steps + 3):
            sync(str(dev))
            start = time.perf_counter()
            run()
            sync(str(dev))
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times[3:])

    with torch.inference_mode():
        eager = forward().clone()
        result = {"eager": median_ms(forward)}
        if cuda:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    forward()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = forward()
            result["captured"] = median_ms(graph.replay)
            result["max_abs_logit_diff"] = (captured.float() - eager.float()).abs().max().item()
    return result


def step_table(model: MedusaModel, tokenizer, batches: tuple[int, ...], prompt_len: int, steps: int) -> dict:
    """Median ms of one engine step by tree and batch, and each tree's cost over the root-only step."""
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (prompt_len,), generator=g).tolist()
    trees = {name: preset(name) for name in TREES} | {"bundled": heads_tree(str(BUNDLED_MODEL / "medusa"))}
    table = {}
    for b in batches:
        for name, tree in trees.items():
            table[f"{name}@{b}"] = 1e3 * step_times(model, tokenizer, prompt, b, tree, steps)
    for b in batches:
        for name in trees:
            table[f"{name}@{b}/root"] = table[f"{name}@{b}"] / table[f"root@{b}"]
    return table


def bundled_parity(device: str, dtype: torch.dtype, prompts: list[str], new: int) -> dict:
    """Speculative vs standard greedy on the bundled model, batch 1 on `device` in `dtype`: identical
    sequences (fp32 must be all), token agreement, accepted tokens per step; fp32 also against HF."""
    model, tokenizer = load_medusa_model(str(BUNDLED_MODEL), str(BUNDLED_MODEL / "medusa"), device=device, dtype=dtype,
                                         deepspeed=False)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    _, std = engine_generate(model, tokenizer, preset("root"), ids, new)
    _, spec = engine_generate(model, tokenizer, heads_tree(str(BUNDLED_MODEL / "medusa")), ids, new)
    same_tokens = sum(a == b for s, p in zip(std, spec) for a, b in zip(s.tokens, p.tokens))
    result = {"dtype": str(dtype).removeprefix("torch."), "prompts": len(prompts), "new_tokens": new,
              "sequences_identical": sum(s.tokens == p.tokens for s, p in zip(std, spec)),
              "token_agreement": same_tokens / sum(len(s.tokens) for s in std),
              "accepted_tokens_per_step": sum(s.decode_tokens for s in spec) / sum(s.decode_steps for s in spec)}
    if dtype == torch.float32:
        _, hf = hf_generate(model.model, ids, new, tokenizer.pad_token_id or 0)
        result["standard_equals_hf"] = sum(s.tokens == h for s, h in zip(std, hf))
    return result


class Report:
    """Figures by section, written to disk after each; a failed section records its error and the run goes on."""

    def __init__(self, path: Path, only: set[str]):
        self.path, self.figures, self.only = path, {}, only  # only: run just these sections (empty: all)

    def section(self, name: str, fn, *args, **kwargs) -> dict | None:
        if self.only and name not in self.only:
            return None
        start = time.perf_counter()
        print(f"--- {name}", flush=True)
        try:
            value = fn(*args, **kwargs)
        except Exception:
            value = {"error": traceback.format_exc(limit=4)}
        self.figures[name] = value
        self.figures.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)
        self.path.write_text(json.dumps(self.figures, indent=1, default=str) + "\n")
        print(json.dumps(value, indent=1, default=str), flush=True)
        return None if isinstance(value, dict) and "error" in value else value


def environment(device: str) -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "device": device}
    try:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    except ImportError:
        env["deepspeed"] = None
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a toy shape instead of 7B (to test this script)")
    parser.add_argument("--deepspeed", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per cell of the step table")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also HF generate() with a static cache and a compiled forward")
    parser.add_argument("--only", type=lambda v: set(v.split(",")), default=set(),
                        help="comma-separated sections to run (default: all), e.g. captured_forward_ms")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out / "gpu_figures.json", args.only | {"environment", "copy_bandwidth_gb_s", "shape"}
                    if args.only else set())
    dtype = torch.float32 if args.device == "cpu" else torch.float16
    shape, prompt_len, new = (SHAPE_TINY, 16, 16) if args.tiny else (SHAPE_7B, 128, 128)
    prompts = json.loads((ROOT / "benchmark_prompts.json").read_text())["prompts"][: 4 if args.tiny else 16]

    report.section("environment", environment, args.device)
    bandwidth = report.section("copy_bandwidth_gb_s", lambda: copy_bandwidth(args.device, 0.0625 if args.tiny else 4) / 1e9)
    model = random_medusa(shape, args.device, dtype, args.deepspeed)
    tokenizer = numbered_tokenizer(shape["vocab_size"])
    weight_bytes = sum(p.numel() * p.element_size() for p in model.model.parameters())
    report.section("shape", lambda: {**shape, "parameters": sum(p.numel() for p in model.model.parameters()),
                                     "weight_gb": weight_bytes / 1e9, "dtype": str(dtype), "deepspeed": args.deepspeed,
                                     "floor_ms_per_step": 1e3 * weight_bytes / (bandwidth * 1e9) if bandwidth else None})
    steps = report.section("step_ms", step_table, model, tokenizer, (1, 32), prompt_len, args.steps)
    plain = MedusaModel(model.model, model.heads)  # the HF model itself: DeepSpeed's wrapper adds a Python call
    kv_len = max(4 * prompt_len, prompt_len + 128)
    report.section("captured_forward_ms", lambda: {
        f"{t}@{b}": static_forward(plain, b, t, kv_len, prompt_len, args.steps) for b in (1, 32) for t in (1, 16, 64)})
    report.section("engine_standard_tokens_per_s", lambda: {
        f"batch_{b}": engine_tokens_per_s(model, tokenizer, b, prompt_len, new, "root") for b in (1, 32)})
    report.section("hf_generate_eager", hf_generate_tokens_per_s, model.model, prompt_len, new, False)
    fp32 = report.section("bundled_fp32", bundled_parity, args.device, torch.float32, prompts, new)
    if args.device.startswith("cuda"):
        report.section("bundled_fp16", bundled_parity, args.device, torch.float16, prompts, new)
    if steps and fp32:
        report.section("projected_speedup", lambda: {
            f"batch_{b}": fp32["accepted_tokens_per_step"] / steps[f"bundled@{b}/root"] for b in (1, 32)}
            | {"note": "the bundled heads' accepted tokens per step with their own tree (measured above, fp32) over "
                       "that tree's step cost on the 7B shape relative to a root-only step; step_ms's ratios are "
                       "the accepted tokens per step each tree needs to break even"})
    if args.compile and args.device.startswith("cuda"):  # last: compiling takes the better part of a minute
        report.section("hf_generate_static_compiled", hf_generate_tokens_per_s, model.model, prompt_len, new, True)


if __name__ == "__main__":
    main()
