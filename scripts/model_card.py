"""Write the bundled model's card (README.md in its folder) from the reports the other scripts
saved: training.json (base), medusa/training.json (heads), medusa/tree_tuning.json, medusa/eval.json.

    python -m scripts.model_card models/pycoder-4m
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from safetensors import safe_open


def parameters(folder: Path) -> tuple[float, str]:
    """Millions of parameters in the model's safetensors, and their dtype."""
    count, dtypes = 0, set()
    for f in folder.glob("model*.safetensors"):
        with safe_open(f, "pt") as st:
            for key in st.keys():
                tensor = st.get_slice(key)
                count += math.prod(tensor.get_shape())
                dtypes.add(tensor.get_dtype())
    return count / 1e6, "/".join(sorted(dtypes))


def card(folder: Path) -> str:
    base = json.loads((folder / "training.json").read_text())
    heads = json.loads((folder / "medusa" / "training.json").read_text())
    tuning = json.loads((folder / "medusa" / "tree_tuning.json").read_text())
    ev = json.loads((folder / "medusa" / "eval.json").read_text())
    tree = json.loads((folder / "medusa" / "medusa_choices.json").read_text())
    shape, sched, corpus = base["shape"], base["schedule"], base["corpus"]
    params, dtype = parameters(folder)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
    top1, top5 = heads["held_out"]["top1"], heads["held_out"]["top5"]
    rows = "\n".join(
        f"| {r['nodes']} | {r['tokens_per_step']:.2f} | {r['step_ms']:.2f} | {r['tokens_per_s']:.0f} |"
        for r in tuning["sizes"]
    )
    held = "\n".join(f"    {name}" for name in corpus["held_out_files"])
    return f"""# {folder.name}: a small Python code model with Medusa heads

A Llama-architecture causal LM trained from scratch on this machine's CPU by
`scripts/build_model.py`, with 4 Medusa heads trained by `train_medusa.py` and a tree chosen by
`scripts/tune_tree.py`. It exists so that the service runs with no download: it is the service's
default model and the one its tests use. It writes plausible-looking Python (and, greedy, often
loops), not correct programs. Its heads are really accepted (speculative output is identical to
standard output, with fewer steps), but on this 2-core CPU a verify step of even 10 nodes costs
about 1.7 plain steps, so speculation only breaks even here (see Results and the tree table).

## Model

| | |
|---|---|
| architecture | `LlamaForCausalLM`, hidden {shape['hidden_size']}, {shape['layers']} layers, {shape['heads']} attention heads, MLP {shape['intermediate_size']}, tied embeddings |
| parameters | {params:.1f} M ({dtype} safetensors, shards under 10 MB) |
| tokenizer | byte-level BPE, {shape['vocab_size']} tokens, `<s>` prepended (`tokenizers`) |
| context | {shape['context']} tokens (trained on windows of {sched['seq_len']}) |
| folder size | {size:.1f} MB |

## Data

The Python sources installed beside the project: the standard library of Python 3.11 and the
virtual environment's site-packages (torch, transformers, deepspeed, numpy, sympy, networkx, pip,
pydantic, ...), files over 200 kB skipped: {corpus['files']['train']} training files
({corpus['tokens']['train'] / 1e6:.1f} M tokens) and {corpus['files']['held_out']} held-out files
({corpus['tokens']['held_out'] / 1e6:.2f} M tokens). A file is held out when
{corpus['held_out_rule']}, over the name `stdlib/<path>` or `site-packages/<path>` (the list is at the end).

## Training

* Base: AdamW (lr {sched['lr']}, betas 0.9/0.95, weight decay {sched['weight_decay']}), {sched['warmup']} warm-up
  steps then cosine to {sched['min_lr_ratio']} of the peak, batch {sched['batch']} x {sched['seq_len']} tokens, bf16 autocast,
  `torch.compile`; {base['steps']} steps = {base['tokens_seen'] / 1e6:.1f} M tokens in {base['train_seconds'] / 60:.0f} min on {base['hardware']}.
* Heads: 4 heads, 1 residual block each, sharing the base lm_head ("version 2" layout, {(folder / 'medusa' / 'medusa_lm_head.safetensors').stat().st_size / 2**20:.1f} MB);
  Medusa-1 loss (sum of 0.8^k CE for the token 2+k ahead), self-distilled on the base model's greedy
  continuations of {heads['args']['sequences']} training prompts; {heads['args']['steps']} steps, lr {heads['args']['lr']},
  {heads['seconds'] / 60:.0f} min on {heads['hardware']}.

## Results

| | |
|---|---|
| held-out loss | {ev['held_out_loss']:.3f} nats/token over {ev['held_out_tokens_scored'] / 1e6:.2f} M held-out tokens |
| heads top-1 on held-out greedy continuations | {' / '.join(f'{a:.2f}' for a in top1)} |
| heads top-5 | {' / '.join(f'{a:.2f}' for a in top5)} |
| distinct word 3-grams in 128-token greedy continuations | {ev['distinct_word_trigrams']:.2f} |
| default tree | `{tree['name']}`: {ev['tree']['nodes']} nodes with the root, depth {ev['tree']['depth']} |
| accepted tokens per step (default tree, greedy, {ev['setup']}) | {ev['accepted_tokens_per_step']:.2f} |
| tokens/s: HF `generate()` / standard / speculative | {ev['tokens_per_s']['hf']} / {ev['tokens_per_s']['standard']} / {ev['tokens_per_s']['speculative']} |
| speculative / standard; standard / HF `generate()` | {ev['speculative_vs_standard']:.2f}x; {ev['standard_vs_hf']:.2f}x |
| outputs identical (speculative = standard; standard = HF) | {ev['speculative_equals_standard']}; {ev['standard_equals_hf']} |

Reproduce: `python -m scripts.eval_model --model {folder} --heads {folder}/medusa`.

A greedy continuation of a held-out prompt (prompt and continuation):

```python
{ev['sample']}
```

## The tree

Chosen on this machine from measurements (`python -m scripts.tune_tree`): the nodes are added
greedily by their measured probability of acceptance (the joint ranks of the true greedy tokens
under the four heads, on {tuning['positions']} positions of held-out continuations), and the size is
the one with the most expected tokens per second, expected tokens per step over the measured step
time at batch 1:

| nodes | expected tokens/step | step ms | expected tokens/s |
|---|---|---|---|
{rows}

Paths (`medusa/medusa_choices.json`): `{tree['paths']}`

## Targets not met (and why)

The project's targets for this model were a held-out loss <= 1.6, distinct 3-grams >= 0.5,
>= 2.5 accepted tokens per step and speculative >= 2x standard on this CPU. This CPU-trained build
misses all four: 33 M tokens of training (the time a session allowed on 2 cores) leave the loss at
{ev['held_out_loss']:.2f} and the greedy text repetitive, heads on a weaker model are accepted less, and
on 2 cores a 4 M-parameter model's step is only partly bound by reading weights (a 1-token step
{tuning['sizes'][0]['step_ms']:.1f} ms; verifying 8-16 tokens plus the heads costs 1.7-2x that). The
planned fix is to train a larger model (about 14 M parameters, whose step is more weight-bound)
on a GPU with the same scripts.

## Held-out files

{held}
"""


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    (folder / "README.md").write_text(card(folder))
