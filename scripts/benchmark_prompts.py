"""Write benchmark.py's built-in prompts: the starts of held-out files of the bundled model's corpus
(files it was not trained on), as text.

    python -m scripts.benchmark_prompts                 # writes benchmark_prompts.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoTokenizer

from scripts.corpus import held_out_prompts, model_held_out
from settings import BUNDLED_MODEL

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(BUNDLED_MODEL))
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmark_prompts.json")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = held_out_prompts(tokenizer, model_held_out(args.model), args.count, args.tokens)
    texts = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
    source = (f"python -m scripts.benchmark_prompts --count {args.count} --tokens {args.tokens}: {args.tokens}-token "
              f"starts of lines in held-out files of {Path(args.model).name}'s corpus")
    args.out.write_text(json.dumps({"source": source, "prompts": texts}, indent=1) + "\n")
    print(f"{len(texts)} prompts -> {args.out}")


if __name__ == "__main__":
    main()
