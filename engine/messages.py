"""What the HTTP process and the engine process send each other: plain, picklable data, and no torch
(the HTTP process imports this module and never the engine itself).

HTTP process -> engine process, over a multiprocessing queue: Submit and Cancel (None: stop).
Engine process -> HTTP process, over a pipe: ServedInfo or LoadFailed once, then a Report per round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FAILED = "error"  # the finish reason of a sequence whose step failed for it
CONTEXT_TOKENS = 5  # a token's text is decoded after at most this many tokens of left context, on both sides

TokenLogprob = tuple[float, list[tuple[int, float]]]  # (log p of the token, top alternatives by log p)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed
    acceptance: Literal["exact", "typical"] = "exact"
    typical_epsilon: float = 0.09
    typical_delta: float = 0.3

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def draws(self, accepted: int) -> int:
        """Uniform numbers a step used, given the nodes it accepted (the root included)."""
        return 1 if self.acceptance == "typical" else accepted


GREEDY = SamplingParams()


@dataclass(frozen=True)
class Request:
    """One sequence to decode (an HTTP request's choice)."""

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


# ---- HTTP process -> engine process ---------------------------------------------------------------


@dataclass(frozen=True)
class Submit:
    requests: list[Request]


@dataclass(frozen=True)
class Cancel:
    request_ids: list[str]


# ---- engine process -> HTTP process ---------------------------------------------------------------


@dataclass(frozen=True)
class ServedInfo:
    """The served model as the HTTP process knows it: it never holds the model itself."""

    tokenizer: Any  # the model's Hugging Face tokenizer (the HTTP process tokenises and renders chats)
    num_heads: int
    tree: dict  # the configured tree: {"name", "nodes", "depth"}
    device: str
    dtype: str
    deepspeed: bool
    cuda_graphs: bool
    max_batch_size: int
    max_context: int
    vocab_size: int
    threads: int | None  # the engine's intra-op threads, on CPU
    adaptive: bool  # each step's tree is chosen for its batch
    weights: str  # where the base weights came from, and in which form they are served

    @property
    def speculative(self) -> bool:
        return self.num_heads > 0 and self.tree["nodes"] > 1


@dataclass(frozen=True)
class LoadFailed:
    message: str  # the traceback is in the engine process's log


@dataclass(frozen=True)
class Done:
    """A sequence's end, with its decode statistics."""

    finish_reason: str
    decode_steps: int
    decode_tokens: int
    engine_seconds: float  # from its admission to its end: the engine's own time for it


@dataclass
class Report:
    """One round of the loop (or, sent before the round's forwards, only who was admitted and dropped)."""

    events: list[Event] = field(default_factory=list)
    done: dict[str, Done] = field(default_factory=dict)  # finished this round (cancelled ones too)
    admitted: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # cancelled while waiting: never admitted
    failed: list[str] = field(default_factory=list)  # in a step that raised
    prompt_tokens: int = 0
    batch_size: int = 0  # sequences the round's decode step decoded (0: no step)
    tree: dict | None = None  # Tree.describe() of the step's tree for speculative sequences, if it had any
    seconds: float = 0.0
