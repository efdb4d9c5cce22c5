"""Generating text on top of the batcher: a validated request becomes engine Requests (one per prompt
and choice); their updates become one JSON response or a stream of SSE chunks.

`Generation` is what every endpoint shares (limits, engine requests, updates, metrics, usage, the
SSE stream and its errors); completions.py adds the legacy text shape, chat.py the chat shape."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from batch_processor import DynamicBatcher, EngineFailure, RequestTimeout, Ticket, Update
from engine.messages import CONTEXT_TOKENS, Request, SamplingParams, TokenLogprob
from server.metrics import ServiceMetrics
from server.protocol import GenerationRequest
from server.responses import GenerationChunk, Metrics, Usage, error_body

log = logging.getLogger(__name__)
Offload = Callable[..., Awaitable]  # offload(fn, *args): fn(*args) on the tokenizer's thread, awaited

# Sampling parameters a step can always take (vLLM's and HF's conventions): a temperature this small
# is greedy (dividing by it overflows fp32 logits into NaN), top_k at or past the vocabulary is off,
# and top_p stays a positive fp32 number (1e-46 rounds to 0 and keeps no token at all).
MIN_TEMPERATURE = 1e-5
MIN_TOP_P = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Limits:
    max_context: int
    max_tokens: int
    max_n: int
    vocab_size: int
    speculative_default: bool
    max_prompt_chars: int  # a longer text cannot fit the context: refused before it is tokenised


def max_prompt_chars(tokenizer: PreTrainedTokenizerBase, max_context: int) -> int:
    """Characters beyond which a text has more tokens than the context holds, whatever it says: the
    context times the longest token's text (twice, for what normalisers and markers add)."""
    longest = max(len(tokenizer.decode([i])) for i in range(len(tokenizer)))
    return 2 * max_context * (longest + 1)


def check_fits(ids: list[int], max_tokens: int, limits: Limits, param: str = "prompt") -> None:
    if not ids:
        raise BadRequest("prompt is empty", param)
    if len(ids) + max_tokens > limits.max_context:
        raise BadRequest(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                         f"{limits.max_context} tokens", param)


def engine_requests(req: GenerationRequest, prompts: list[tuple[str, list[int]]], max_tokens: int, limits: Limits
                    ) -> list[Request]:
    """One Request per choice, in choice order: prompt-major, then n."""
    spec = limits.speculative_default if req.speculative is None else req.speculative and limits.speculative_default
    base = uuid.uuid4().hex
    return [
        Request(f"{base}-{i}-{j}", ids, max_new_tokens=max_tokens, stop=tuple(req.stop), ignore_eos=req.ignore_eos,
                speculative=spec, logprobs=req.alternatives, score_prompt=req.echo and req.alternatives is not None,
                sampling=sampling_params(req, j, limits.vocab_size))
        for i, (_, ids) in enumerate(prompts)
        for j in range(req.n)
    ]


def sampling_params(req: GenerationRequest, choice: int, vocab_size: int) -> SamplingParams:
    """The request's sampling, in the ranges a step can take (see MIN_TEMPERATURE). Choice j of a
    seeded request gets its own seed, the same for every prompt of the request."""
    return SamplingParams(
        temperature=req.temperature if req.temperature >= MIN_TEMPERATURE else 0.0,
        top_k=req.top_k if req.top_k is not None and req.top_k < vocab_size else 0,
        top_p=max(req.top_p, MIN_TOP_P),
        seed=None if req.seed is None else derive_seed(req.seed, choice),
        acceptance=req.acceptance,
        typical_epsilon=req.typical_epsilon,
        typical_delta=req.typical_delta,
    )


def derive_seed(seed: int, index: int) -> int:
    """The seed of choice `index` of a request (choice 0 keeps the request's seed)."""
    return seed if index == 0 else (seed * 6364136223846793005 + index * 1442695040888963407) % 2**63


def piece_texts(tokenizer: PreTrainedTokenizerBase, ids: list[int], start: int, end: int) -> list[str]:
    """The text each of ids[start:end] adds to the decode of the ids before it (a token inside a
    multi-byte character adds ""), each decoded after at most CONTEXT_TOKENS of left context (a
    character spans at most 4 byte tokens), so that the work grows linearly with the length."""
    texts = []
    for i in range(start, end):
        left = max(0, i - CONTEXT_TOKENS)
        previous = tokenizer.decode(ids[left:i], skip_special_tokens=True)
        current = tokenizer.decode(ids[left : i + 1], skip_special_tokens=True)
        texts.append(current[len(previous):] if current.startswith(previous) else "")
    return texts


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    prompt_text: str
    prompt_ids: list[int]
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    decode_steps: int = 0
    decode_tokens: int = 0
    engine_seconds: float = 0.0
    prompt_logprobs: list[TokenLogprob | None] | None = None  # [None] (the first token) + the rest, when scored

    def prompt_texts(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """The text each prompt token adds."""
        return piece_texts(tokenizer, self.prompt_ids, 0, len(self.prompt_ids))

    def token_texts(self, tokenizer: PreTrainedTokenizerBase, start: int, end: int) -> list[str]:
        """The text each of tokens[start:end] adds, decoded after the prompt's last tokens (so that
        SentencePiece spaces are kept)."""
        tail = self.prompt_ids[-CONTEXT_TOKENS:]
        return piece_texts(tokenizer, tail + self.tokens, len(tail) + start, len(tail) + end)

    def add(self, update: Update) -> None:
        e = update.event
        self.text += e.text
        self.tokens += e.token_ids
        self.logprobs += e.logprobs or []
        if e.prompt_logprobs is not None:
            self.prompt_logprobs = [None, *e.prompt_logprobs]
        self.finish_reason = e.finish_reason
        if update.done is not None:
            self.decode_steps = update.done.decode_steps
            self.decode_tokens = update.done.decode_tokens
            self.engine_seconds = update.done.engine_seconds


class Generation:
    """One HTTP request for generated text in flight, whichever its endpoint: its engine requests,
    what its choices have produced, its metrics, and its SSE stream. Subclasses give the shapes."""

    kind = "cmpl"  # the prefix of its id
    chunk_object = "text_completion"

    def __init__(self, req: GenerationRequest, model_id: str, tokenizer: PreTrainedTokenizerBase, limits: Limits,
                 batcher: DynamicBatcher, metrics: ServiceMetrics, offload: Offload, timeout_s: float = 0.0):
        """Builds the prompts (tokenising: this runs on the tokenizer's thread, like every method here
        that decodes)."""
        self.req, self.model_id, self.tokenizer, self.batcher, self.metrics = req, model_id, tokenizer, batcher, metrics
        self.offload = offload
        self.timeout_s = timeout_s  # 0: none
        self.id, self.created = f"{self.kind}-{uuid.uuid4().hex}", int(time.time())
        self.prompts, self.max_tokens = self.prompts_of(req, tokenizer, limits)
        self.requests = engine_requests(req, self.prompts, self.max_tokens, limits)
        self.choices = [ChoiceState(text, ids) for text, ids in self.prompts for _ in range(req.n)]
        self.start = time.perf_counter()
        self.first_token: float | None = None
        self.last_token: float | None = None

    def prompts_of(self, req, tokenizer: PreTrainedTokenizerBase, limits: Limits
                   ) -> tuple[list[tuple[str, list[int]]], int]:
        """(text, ids) per prompt, and max_tokens; BadRequest when they do not fit the limits."""
        raise NotImplementedError

    def submit(self) -> Ticket | None:
        """Queue the choices (raises QueueFull); None when there is nothing to generate or score (max_tokens
        0 with echo and logprobs scores the prompt: the engine prefills it and emits no token)."""
        scores = any(r.score_prompt for r in self.requests)
        return self.batcher.submit(self.requests) if self.max_tokens > 0 or scores else None

    def _observe(self, update: Update) -> None:
        now, n = time.perf_counter(), len(update.event.token_ids)
        if n and self.first_token is None:
            self.first_token = now
            self.metrics.ttft.observe(now - self.start)
        elif n and self.last_token is not None:
            for _ in range(n):
                self.metrics.itl.observe((now - self.last_token) / n)
        self.last_token = now if n else self.last_token
        self.choices[update.index].add(update)

    async def updates(self, ticket: Ticket | None) -> AsyncIterator[Update]:
        if ticket is None:
            for c in self.choices:
                c.finish_reason = "length"
            return
        try:
            async for update in ticket.stream(self.start + self.timeout_s if self.timeout_s else None):
                self._observe(update)
                yield update
        except EngineFailure:
            self.metrics.failures.inc()
            raise
        except RequestTimeout:
            self.metrics.timeouts.inc()
            raise
        finally:
            self.batcher.cancel(ticket)  # a no-op once every choice has finished
        self._finished()

    def _finished(self) -> None:
        self.metrics.e2e.observe(time.perf_counter() - self.start)
        for c in self.choices:
            self.metrics.success.labels(c.finish_reason).inc()
            if c.decode_steps:
                self.metrics.accepted.observe(c.decode_tokens / c.decode_steps)

    def timeout_message(self) -> str:
        return f"the request did not finish within the server's request timeout of {self.timeout_s:g} s"

    def usage(self) -> Usage:
        prompt = sum(len(ids) for _, ids in self.prompts)
        completion = sum(len(c.tokens) for c in self.choices)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def run_metrics(self) -> Metrics:
        steps = sum(c.decode_steps for c in self.choices)
        tokens = sum(c.decode_tokens for c in self.choices)
        ttft = None if self.first_token is None else 1e3 * (self.first_token - self.start)
        return Metrics(decode_steps=steps, accepted_tokens_per_step=tokens / steps if steps else None, ttft_ms=ttft,
                       total_ms=1e3 * (time.perf_counter() - self.start),
                       engine_ms=1e3 * max(c.engine_seconds for c in self.choices))

    def top_texts(self, alternatives: list[tuple[int, float]]) -> dict[str, float]:
        """{token text: log p}, most likely first; tokens that decode alike keep the higher value."""
        top: dict[str, float] = {}
        for token, logprob in alternatives:
            top.setdefault(self.tokenizer.decode([token]), logprob)
        return top

    def response(self):
        raise NotImplementedError

    def response_json(self) -> str:
        return self.response().model_dump_json()

    # ---- the stream: shapes from the subclass, the order and the errors here -----------------------

    def opening_chunks(self, scored: bool) -> list[str]:
        """Chunks before the first update (`scored`: the prompt's log-probs will come in an update)."""
        return []

    async def update_chunks(self, u: Update, offset: int) -> list[str]:
        """The chunks of one update of choice u.index, whose text so far is `offset` characters long."""
        raise NotImplementedError

    def finish_chunks(self, index: int, finish_reason: str) -> list[str]:
        """The chunks that end choice `index` when nothing was generated (max_tokens 0)."""
        raise NotImplementedError

    def envelope(self, choices: list) -> str:
        """One chunk's JSON: these choices, and `usage` null when the client asked for it at the end."""
        usage = {"usage": None} if self.req.include_usage else {}
        return GenerationChunk(id=self.id, object=self.chunk_object, created=self.created, model=self.model_id,
                               choices=choices, **usage).json()

    async def sse(self, ticket: Ticket | None) -> AsyncIterator[dict]:
        """SSE events: the opening chunks, the chunks of each update, usage, then [DONE]; an error after
        the stream started goes in-band."""
        emitted = [len(c.prompt_text) if self.req.echo else 0 for c in self.choices]  # characters sent per choice
        try:
            for chunk in self.opening_chunks(scored=self.req.echo and self.req.alternatives is not None and
                                             ticket is not None):
                yield {"data": chunk}
            async for u in self.updates(ticket):
                for chunk in await self.update_chunks(u, emitted[u.index]):
                    yield {"data": chunk}
                emitted[u.index] += len(u.event.text)
            if ticket is None:
                for i in range(len(self.choices)):
                    for chunk in self.finish_chunks(i, "length"):
                        yield {"data": chunk}
        except EngineFailure as e:
            yield {"data": json.dumps(error_body(500, str(e)))}
            yield {"data": "[DONE]"}
            return
        except RequestTimeout:
            yield {"data": json.dumps(error_body(504, self.timeout_message()))}
            yield {"data": "[DONE]"}
            return
        except Exception:  # the stream has started: the error goes in-band
            log.exception("streaming failed")
            yield {"data": json.dumps(error_body(500, "internal server error"))}
            yield {"data": "[DONE]"}
            return
        finally:
            if ticket is not None:
                self.batcher.cancel(ticket)  # a disconnect ends the stream here; a no-op once all finished
        if self.req.include_usage:
            yield {"data": GenerationChunk(id=self.id, object=self.chunk_object, created=self.created,
                                           model=self.model_id, choices=[], usage=self.usage(),
                                           metrics=self.run_metrics()).json()}
        yield {"data": "[DONE]"}
