"""Write benchmark.py's built-in prompts: held-out chat prompts (training/chat_prompts.py: subjects the
default model's heads were not trained on), rendered with the model's chat template as the text of a
completion request (one user turn, the template's default system prompt).

    python -m bench.benchmark_prompts                 # writes benchmark_prompts.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from transformers import AutoTokenizer

from config.settings import DEFAULT_MODEL
from load_medusa_from_hf import resolve_model
from training.chat_prompts import chat_prompts, split

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmark_prompts.json")
    args = parser.parse_args()
    source = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(source.name, **({"gguf_file": source.gguf_file} if source.gguf_file else {}))
    _, held_out = split(chat_prompts())
    kinds = {}
    for p in held_out:
        kinds.setdefault(p.kind, []).append(p)
    rounds = itertools.zip_longest(*(ps[:: max(1, len(ps) // 6)] for ps in kinds.values()))  # every kind, in turn
    chosen = [p for r in rounds for p in r if p is not None][: args.count]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p.text}], add_generation_prompt=True,
                                           tokenize=False) for p in chosen]
    about = (f"python -m bench.benchmark_prompts --count {args.count}: held-out chat prompts of "
             f"training/chat_prompts.py, in {Path(args.model).name}'s chat template")
    args.out.write_text(json.dumps({"source": about, "prompts": texts}, indent=1) + "\n")
    print(f"{len(texts)} prompts -> {args.out}")


if __name__ == "__main__":
    main()
