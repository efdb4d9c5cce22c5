"""The in-process baseline that benchmark.py runs between its HTTP phases (--baseline-hf): HF
`generate()` and the service's own engine in the benchmark's process, batch 1."""

from __future__ import annotations

import statistics
import time


class InProcess:
    """HF `generate()` and the service's own engine (built by the same `load_served` as the server) in
    this process, batch 1, one request after the other, on the requests of the lowest level; run once
    per repeat, between the HTTP phases, so that machine drift hits them too."""

    def __init__(self, model: str, heads: str, prompts: list[str], modes: tuple[str, ...], max_tokens: int):
        from config.settings import Settings
        from engine.serving import load_served

        self.engine = load_served(Settings(model_name=model, medusa_heads=heads, max_batch_size=1)).engine
        self.ids = [self.engine.tokenizer(p)["input_ids"] for p in prompts]
        self.max_tokens, self.modes = max_tokens, modes
        self.seconds: dict[str, list[float]] = {"hf": [], **{m: [] for m in modes}}  # per request
        self.outputs: dict[str, list[list[int]]] = {mode: [] for mode in self.seconds}

    def run(self) -> None:
        import torch

        from bench.bench_engine import hf_generate
        from engine.messages import Request

        pad = self.engine.tokenizer.pad_token_id or 0
        with torch.inference_mode():
            for p in self.ids:
                seconds, out = hf_generate(self.engine.model.model, [p], self.max_tokens, pad)
                self.seconds["hf"].append(seconds)
                self.outputs["hf"] += out
            for mode in self.modes:
                for i, p in enumerate(self.ids):
                    start = time.perf_counter()
                    seq, = self.engine.generate([Request(str(i), p, self.max_tokens, ignore_eos=True,
                                                         speculative=mode == "speculative")])
                    self.seconds[mode].append(time.perf_counter() - start)
                    self.outputs[mode].append(seq.tokens)

    def result(self) -> dict:
        return {"prompt_tokens": [len(p) for p in self.ids],
                "seconds_per_request": {k: statistics.median(v) for k, v in self.seconds.items()},
                "tokens_per_s": {k: self.max_tokens * len(v) / sum(v) for k, v in self.seconds.items()},
                "standard_equals_hf": self.outputs["standard"] == self.outputs["hf"],
                "speculative_equals_standard": self.outputs["speculative"] == self.outputs["standard"]}
