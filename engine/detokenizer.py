"""Token ids to text deltas, incrementally, with OpenAI stop strings.

Decoding only a short window per token keeps streaming O(1) per token, and decoding the window
with a few tokens of left context keeps SentencePiece-style leading spaces. An incomplete UTF-8
tail (decoded as U+FFFD) is held back until the bytes that complete it arrive.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from engine.messages import CONTEXT_TOKENS  # left context decoded with each new token (the HTTP side's too)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix = 0  # window start: context for the tokens not yet turned into text
        self.read = len(self.ids)  # tokens before this are already text
        self.prefix_text = self._decode(self.prefix, self.read)

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=True)

    def push(self, token: int) -> str:
        """The text that `token` completes ("" while a multi-byte character is still partial)."""
        self.ids.append(token)
        text = self._decode(self.prefix)
        if len(text) <= len(self.prefix_text) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        delta, self.prefix_text = text[len(self.prefix_text) :], self._decode(self.prefix)
        if self.prefix > CONTEXT_TOKENS:  # keep the list short: drop what no window reaches
            del self.ids[: self.prefix]
            self.read -= self.prefix
            self.prefix = 0
        return delta

    def flush(self) -> str:
        """Whatever is held back at the end of generation, replacement characters included."""
        text = self._decode(self.prefix)
        return text[len(self.prefix_text) :] if len(text) > len(self.prefix_text) else ""


class StopMatcher:
    """Cuts the text before the first stop string and holds back a tail that may start one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.sent = 0  # characters of `text` already released

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to release, whether a stop string was found)."""
        self.text += delta
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self.flush(), True
        end = len(self.text) - self._held()
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out, False

    def _held(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        tail = self.text[self.sent :]
        for n in range(min(len(tail), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


class TextStream:
    """Text deltas for one sequence: detokenisation, then stop strings."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], stops: tuple[str, ...]):
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stops = StopMatcher(stops)

    def push(self, token: int) -> tuple[str, bool]:
        return self.stops.feed(self.detokenizer.push(token))

    @property
    def length(self) -> int:
        """Characters of text so far (cut at a stop string), released or held back."""
        return len(self.stops.text)

    @property
    def released(self) -> int:
        """Characters of text released so far."""
        return self.stops.sent

    def finish(self) -> str:
        tail, _ = self.stops.feed(self.detokenizer.flush())
        return tail + self.stops.flush()
