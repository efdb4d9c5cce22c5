"""One request's life in the engine: what it has produced, and when it stops (the Request and the Events
it emits are messages: engine/messages.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.detokenizer import TextStream
from engine.messages import FAILED, Event, Request, TokenLogprob
from engine.sampling import Uniforms


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
    # generated tokens not yet emitted, while the stop matcher holds their text: (token, text offset, log-prob)
    held: list[tuple[int, int, TokenLogprob | None]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def accepted_tokens_per_step(self) -> float | None:
        return self.decode_tokens / self.decode_steps if self.decode_steps else None

    def extend(self, tokens: list[int], from_step: bool, logprobs: list[TokenLogprob] | None = None) -> Event:
        """Append tokens one by one, honouring EOS, stop strings and max_new_tokens. The event carries
        the tokens whose text has begun to be released: a token whose text the stop matcher holds back
        waits, and one whose text a stop string cuts away entirely is never emitted (nor counted)."""
        generated, text, eos = [], [], 0
        for i, token in enumerate(tokens):
            if len(self.tokens) + len(generated) >= self.request.max_new_tokens:  # max_tokens 0: only scored
                self.finish_reason = "length"
                text.append(self.text.finish())
                break
            if token in self.eos_token_ids and not self.request.ignore_eos:
                self.finish_reason, eos = "stop", 1
                text.append(self.text.finish())
                break
            generated.append(token)
            self.held.append((token, self.text.length, None if logprobs is None else logprobs[i]))
            delta, stopped = self.text.push(token)
            text.append(delta)
            if stopped:
                self.finish_reason = "stop"
                break
            if len(self.tokens) + len(generated) >= self.request.max_new_tokens:
                self.finish_reason = "length"
                text.append(self.text.finish())
                break
        self.tokens += generated
        if from_step:  # the end-of-sequence token is decoded like any other, though never emitted
            self.decode_steps += 1
            self.decode_tokens += len(generated) + eos
        released = self._release(cut=self.finish_reason == "stop" and not eos)
        accepted = len(tokens) if from_step else 0
        kept = None if logprobs is None else [lp for _, _, lp in released]
        return Event(self.request.id, [t for t, _, _ in released], "".join(text), self.finish_reason, accepted, kept)

    def _release(self, cut: bool) -> list[tuple[int, int, TokenLogprob | None]]:
        """The held tokens that go out now: those whose text starts before what is released (before the
        cut, at a stop string, the rest then dropped), or all of them once the sequence has ended."""
        if self.done and not cut:
            out, self.held = self.held, []
            return out
        n = sum(1 for _, start, _ in self.held if start < self.text.released)
        out, self.held = self.held[:n], ([] if self.done else self.held[n:])
        return out

    def cancel(self) -> None:
        if not self.done:
            self.finish_reason = "cancelled"

    def fail(self) -> None:
        """Its step failed for it alone (engine.py isolates it): it ends, and only it gets the error."""
        self.finish_reason = FAILED
