"""In-process engine costs on this machine, in one run:

1. the decode step's time by tokens verified per sequence (tree size) and batch size;
2. greedy tokens/s at batch 1 of standard decoding, speculative decoding and Hugging Face
   `generate()` on the same model and prompts (and whether the outputs are identical);
3. seeded sampling at batch 1 (--temperature): standard, exact and typical speculative acceptance,
   and the share of sequences in which exact speculation emits exactly the standard tokens.

    python -m bench.bench_engine                                   # the toy model, built in-process
    python -m bench.bench_engine --model DIR --heads DIR --tree tree15
    python -m bench.bench_engine --model models/pycoder-4m --heads models/pycoder-4m/medusa \
        --tree models/pycoder-4m/medusa/medusa_choices.json --temperature 0.7
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import replace

import torch

from engine.decode import Engine
from engine.messages import GREEDY, Request, SamplingParams
from engine.tree import Tree, load_tree, preset
from load_medusa_from_hf import load_medusa_model
from medusa_model import MedusaModel, wrap_with_deepspeed
from training.toy_model import build_toy, stdlib_texts

STEP_TREES = {1: "root", 4: "chain3", 8: "tree7", 16: "tree15", 64: "mc_sim_7b_63"}


def step_times(model, tokenizer, prompt: list[int], batch: int, tree: Tree | str, steps: int) -> float:
    """Median seconds of one engine step with `batch` sequences, each verifying `tree`."""
    tree = preset(tree) if isinstance(tree, str) else tree
    context = len(prompt) + (steps + 4) * (tree.depth + 1) + 1  # room for every timed step, and no more
    engine = Engine(model, tokenizer, tree=tree, max_batch_size=batch, eos_token_ids=[], max_context=context)
    state = engine.new_batch()
    room = engine.max_context - len(prompt)  # decoding stays within the context for all the timed steps
    engine.admit(state, [Request(str(i), prompt, max_new_tokens=room) for i in range(batch)])
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        engine.step(state)
        if i >= 3:  # warm-up discarded
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def hf_generate(model, prompts: list[list[int]], max_new_tokens: int, pad_id: int, eos: int | None = None
                ) -> tuple[float, list[list[int]]]:
    """Greedy generate() at batch 1: max_new_tokens each, or, given `eos`, up to it (not included).
    Without `eos` no token stops it: an end-of-sequence token is emitted and decoding goes on, as the
    engine does with ignore_eos (min_new_tokens would forbid the token instead)."""
    out, start = [], time.perf_counter()
    config = copy.deepcopy(model.generation_config)
    config.update(eos_token_id=[] if eos is None else eos, do_sample=False, max_new_tokens=max_new_tokens,
                  pad_token_id=pad_id)  # [], not None: None falls back to the model's own
    for p in prompts:
        ids = torch.tensor([p], device=model.device)
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)[0, len(p) :].tolist()
        out.append(seq[: seq.index(eos)] if eos in seq else seq)
    return time.perf_counter() - start, out


def engine_generate(model, tokenizer, tree, prompts, max_new_tokens, sampling=GREEDY, eos: int | None = None):
    """Batch 1, one request after the other (request i seeded with i when sampling), max_new_tokens
    each or, given `eos`, up to it; returns (seconds, sequences)."""
    engine = Engine(model, tokenizer, tree=tree, max_batch_size=1, eos_token_ids=[] if eos is None else [eos])
    start, results = time.perf_counter(), []
    for i, p in enumerate(prompts):
        params = sampling if sampling.greedy else replace(sampling, seed=i)
        results += engine.generate([Request(str(i), p, max_new_tokens=max_new_tokens, sampling=params)])
    return time.perf_counter() - start, results


def sampling_table(model, tokenizer, tree: Tree, prompts, max_new_tokens: int, temperature: float, repeats: int):
    modes = {
        "standard": (preset("root"), SamplingParams(temperature)),
        f"exact {tree.name}": (tree, SamplingParams(temperature)),
        f"typical {tree.name}": (tree, SamplingParams(temperature, acceptance="typical")),
    }
    runs = {mode: [] for mode in modes}
    for _ in range(repeats):  # modes alternate within each repeat
        for mode, (tr, params) in modes.items():
            seconds, seqs = engine_generate(model, tokenizer, tr, prompts, max_new_tokens, params)
            runs[mode].append((len(prompts) * max_new_tokens / seconds, seqs))
    standard = runs["standard"]
    print(f"\nsampling, temperature {temperature}, batch 1, {len(prompts)} prompts x {max_new_tokens} new tokens "
          f"(prompt i seeded with i), median of {repeats} repeats")
    print(f"{'':>24} {'tokens/s':>9} {'vs standard':>12} {'tokens/step':>12} {'== standard':>12}")
    for mode, results in runs.items():
        seqs = results[-1][1]
        rate = statistics.median(r for r, _ in results)
        ratio = statistics.median(r / s for (r, _), (s, _) in zip(results, standard))
        per_step = sum(s.decode_tokens for s in seqs) / sum(s.decode_steps for s in seqs)
        same = sum(a.tokens == b.tokens for a, b in zip(seqs, standard[-1][1]))
        print(f"{mode:>24} {rate:>9.1f} {ratio:>12.2f} {per_step:>12.2f} {f'{same}/{len(seqs)}':>12}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Hugging Face folder or Hub id (default: the toy model)")
    parser.add_argument("--heads", help="Medusa heads folder or Hub id")
    parser.add_argument("--tree", default="tree15", help="tree for the speculative run")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per cell of the step table")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the tokens/s comparison")
    parser.add_argument("--deepspeed", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--quantize", default="auto", choices=("auto", "gguf", "int4", "none"),
                        help="the base weights, as the QUANTIZE setting (with --model)")
    parser.add_argument("--temperature", type=float, help="also compare seeded sampling at this temperature")
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.model:
        model, tokenizer = load_medusa_model(args.model, args.heads, deepspeed=args.deepspeed, quantize=args.quantize)
    else:
        model, tokenizer = build_toy()
        if args.deepspeed:
            model = MedusaModel(model.model, model.heads, wrap_with_deepspeed(model.model, model.dtype))
    corpus = tokenizer("\n".join(stdlib_texts(200)[-20:]))["input_ids"]
    n = args.prompt_tokens
    prompts = [corpus[i * 997 : i * 997 + n] for i in range(args.prompts)]
    print(f"model: {model.config.model_type}, {sum(p.numel() for p in model.model.parameters()) / 1e6:.1f} M "
          f"parameters, {model.num_heads} heads, DeepSpeed {'on' if model.runner is not model.model else 'off'}, "
          f"{torch.get_num_threads()} threads, prompts of {n} tokens")

    print("\nstep time (median ms) by tokens verified per sequence and batch size")
    print(f"{'tokens':>6} {'tree':>13} {'B=1':>8} {'B=8':>8} {'B=1 / 1-token':>15} {'B=8 / 1-token':>15}")
    base = {}
    for tokens, name in STEP_TREES.items():
        if preset(name).depth > model.num_heads:
            continue
        ms = {b: 1e3 * step_times(model, tokenizer, prompts[0], b, name, args.steps) for b in (1, 8)}
        base = base or ms
        print(f"{tokens:>6} {name:>13} {ms[1]:>8.2f} {ms[8]:>8.2f} {ms[1] / base[1]:>15.2f} {ms[8] / base[8]:>15.2f}")

    new, total = args.max_new_tokens, len(prompts) * args.max_new_tokens
    runs = {"HF generate()": [], "standard (engine)": [], f"speculative {load_tree(args.tree).name}": []}
    for _ in range(args.repeats):  # modes alternate within each repeat, so drift hits all of them
        hf_s, hf_out = hf_generate(model.model, prompts, new, tokenizer.pad_token_id or 0)
        std_s, std = engine_generate(model, tokenizer, preset("root"), prompts, new)
        spec_s, spec = engine_generate(model, tokenizer, load_tree(args.tree), prompts, new)
        for runs_of_mode, seconds in zip(runs.values(), (hf_s, std_s, spec_s)):
            runs_of_mode.append(total / seconds)
    rate = {mode: statistics.median(r) for mode, r in runs.items()}
    ratio = {mode: statistics.median(a / b for a, b in zip(r, runs["standard (engine)"])) for mode, r in runs.items()}
    per_step = sum(s.decode_tokens for s in spec) / sum(s.decode_steps for s in spec)
    print(f"\ngreedy, batch 1, {len(prompts)} prompts x {new} new tokens, median of {args.repeats} repeats")
    print(f"{'':>24} {'tokens/s':>9} {'vs standard':>12} {'tokens/step':>12}")
    for mode in runs:
        print(f"{mode:>24} {rate[mode]:>9.1f} {ratio[mode]:>12.2f} {per_step if 'spec' in mode else 1.0:>12.2f}")
    same = all(a.tokens == b.tokens for a, b in zip(spec, std))
    same_hf = all(a.tokens == b for a, b in zip(std, hf_out))
    print(f"speculative == standard: {same}; standard == HF generate(): {same_hf}")
    if args.temperature:
        sampling_table(model, tokenizer, load_tree(args.tree), prompts, new, args.temperature, args.repeats)


if __name__ == "__main__":
    main()
