"""One request's life in the engine: what was asked, what it has produced, when it stops."""

from __future__ import annotations

from dataclasses import dataclass, field

from detokenizer import TextStream
from sampling import GREEDY, SamplingParams, TokenLogprob, Uniforms

FAILED = "error"  # the finish reason of a sequence whose step failed for it


@dataclass(frozen=True)
class Request:
    id: str
    prompt_ids: list[int]
    max_new_tokens: int = 16
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    speculative: bool = True  # False: standard decoding (the root-only tree)
    logprobs: int | None = None  # report each token's log-prob and this many top alternatives
    score_prompt: bool = False  # also the prompt tokens' log-probs (OpenAI's echo with logprobs)
    sampling: SamplingParams = GREEDY


@dataclass(frozen=True)
class Event:
    """What one sequence produced in one admit (prefill) or step."""

    request_id: str
    token_ids: list[int]
    text: str  # delta
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | FAILED once finished
    accepted: int = 0  # tokens the step verified for this sequence before any stop cut (0 for prefill)
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids, when the request asked
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt tokens 1.. (first event only, when asked)


@dataclass
class Sequence:
    request: Request
    text: TextStream
    eos_token_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)  # generated so far
    decode_steps: int = 0
    decode_tokens: int = 0  # decoded by decode steps, an ending EOS included (the prefill's first token excluded)
    finish_reason: str | None = None
    uniforms: Uniforms | None = None  # the request's random numbers, when it samples

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def accepted_tokens_per_step(self) -> float | None:
        return self.decode_tokens / self.decode_steps if self.decode_steps else None

    def extend(self, tokens: list[int], from_step: bool, logprobs: list[TokenLogprob] | None = None) -> Event:
        """Append tokens one by one, honouring EOS, stop strings and max_new_tokens."""
        emitted, text, eos = [], [], 0
        for token in tokens:
            if token in self.eos_token_ids and not self.request.ignore_eos:
                self.finish_reason, eos = "stop", 1
                text.append(self.text.finish())
                break
            emitted.append(token)
            delta, stopped = self.text.push(token)
            text.append(delta)
            if stopped:
                self.finish_reason = "stop"
                break
            if len(self.tokens) + len(emitted) >= self.request.max_new_tokens:
                self.finish_reason = "length"
                text.append(self.text.finish())
                break
        self.tokens += emitted
        if from_step:  # the end-of-sequence token is decoded like any other, though never emitted
            self.decode_steps += 1
            self.decode_tokens += len(emitted) + eos
        accepted = len(tokens) if from_step else 0
        kept = None if logprobs is None else logprobs[: len(emitted)]
        return Event(self.request.id, emitted, "".join(text), self.finish_reason, accepted, kept)

    def cancel(self) -> None:
        if not self.done:
            self.finish_reason = "cancelled"

    def fail(self) -> None:
        """Its step failed for it alone (engine.py isolates it): it ends, and only it gets the error."""
        self.finish_reason = FAILED
