"""The legacy OpenAI text completion (/v1/completions): prompts as text or token ids, echo, and
OpenAI's text logprobs, on the shared Generation (generation.py)."""

from __future__ import annotations

import itertools

from transformers import PreTrainedTokenizerBase

from batch_processor import Update
from engine.messages import Event, TokenLogprob
from server.generation import BadRequest, ChoiceState, Generation, Limits, check_fits
from server.protocol import CompletionRequest
from server.responses import Choice, CompletionChunkChoice, CompletionResponse, Logprobs


def tokenize(req: CompletionRequest, tokenizer: PreTrainedTokenizerBase, limits: Limits) -> list[tuple[str, list[int]]]:
    """(prompt text, prompt ids) per prompt, checked against the model's limits."""
    if req.max_tokens > limits.max_tokens:
        raise BadRequest(f"max_tokens is {req.max_tokens}; this server allows at most {limits.max_tokens}", "max_tokens")
    prompts = req.prompts()
    if len(prompts) * req.n > limits.max_n:
        raise BadRequest(f"{len(prompts)} prompts x n={req.n} choices; at most {limits.max_n} per request", "n")
    out = []
    for p in prompts:
        if len(p) > limits.max_prompt_chars:  # tokenising a megabyte would hold up every other request
            raise BadRequest(f"prompt is longer than the context of {limits.max_context} tokens can hold", "prompt")
        ids = tokenizer(p)["input_ids"] if isinstance(p, str) else p
        check_fits(ids, req.max_tokens, limits)
        if isinstance(p, str):
            out.append((p, ids))
            continue
        if any(not 0 <= t < limits.vocab_size for t in p):
            raise BadRequest(f"token ids must be in [0, {limits.vocab_size})", "prompt")
        out.append((tokenizer.decode(p, skip_special_tokens=True), list(p)))
    return out


class Completion(Generation):
    """A legacy text completion: prompts as text or token ids, echo, and OpenAI's text logprobs."""

    def prompts_of(self, req: CompletionRequest, tokenizer: PreTrainedTokenizerBase, limits: Limits
                   ) -> tuple[list[tuple[str, list[int]]], int]:
        return tokenize(req, tokenizer, limits), req.max_tokens

    def logprobs(self, items: list[TokenLogprob | None], strings: list[str], offset: int) -> Logprobs | None:
        """OpenAI's logprobs object for tokens whose texts are `strings`, the first at `offset`; an
        item None (the first prompt token) has no log-prob."""
        if self.req.logprobs is None:
            return None
        offsets = list(itertools.accumulate(map(len, strings), initial=offset))[:-1]
        top = [self.top_texts(item[1]) if item is not None and self.req.logprobs else None for item in items]
        chosen = [None if item is None else item[0] for item in items]
        return Logprobs(tokens=strings, token_logprobs=chosen, top_logprobs=top, text_offset=offsets)

    def delta_logprobs(self, c: ChoiceState, e: Event, offset: int) -> Logprobs | None:
        """The logprobs of the tokens one event added to choice c, the first at text offset `offset`."""
        strings = c.token_texts(self.tokenizer, len(c.tokens) - len(e.token_ids), len(c.tokens))
        return self.logprobs(e.logprobs or [], strings, offset)

    def echo_logprobs(self, c: ChoiceState) -> Logprobs | None:
        """The prompt's part of logprobs, with echo."""
        items = c.prompt_logprobs or [None] * len(c.prompt_ids)
        return self.logprobs(items, c.prompt_texts(self.tokenizer), 0)

    def response(self) -> CompletionResponse:
        choices = []
        for i, c in enumerate(self.choices):
            echo = c.prompt_text if self.req.echo else ""
            strings = c.token_texts(self.tokenizer, 0, len(c.tokens)) if self.req.logprobs is not None else []
            logprobs = self.logprobs(c.logprobs, strings, len(echo))
            if logprobs is not None and self.req.echo:
                head = self.echo_logprobs(c)
                logprobs = Logprobs(**{k: getattr(head, k) + getattr(logprobs, k) for k in Logprobs.model_fields})
            choices.append(Choice(index=i, text=echo + c.text, finish_reason=c.finish_reason, logprobs=logprobs))
        return CompletionResponse(id=self.id, created=self.created, model=self.model_id, choices=choices,
                                  usage=self.usage(), metrics=self.run_metrics())

    def chunk(self, index: int, text: str, finish_reason: str | None, logprobs: Logprobs | None = None) -> str:
        return self.envelope([CompletionChunkChoice(index=index, text=text, logprobs=logprobs,
                                                    finish_reason=finish_reason)])

    def opening_chunks(self, scored: bool) -> list[str]:
        """The prompts, with echo (when they are scored, their chunk waits for their log-probs)."""
        if not self.req.echo or scored:
            return []
        return [self.chunk(i, c.prompt_text, None) for i, c in enumerate(self.choices)]

    async def update_chunks(self, u: Update, offset: int) -> list[str]:
        e, c, chunks = u.event, self.choices[u.index], []
        if e.prompt_logprobs is not None:  # echo with logprobs: the prompt's chunk once it is scored
            chunks.append(self.chunk(u.index, c.prompt_text, None, await self.offload(self.echo_logprobs, c)))
        if e.text or e.finish_reason or e.token_ids:
            lp = await self.offload(self.delta_logprobs, c, e, offset) if self.req.logprobs is not None else None
            chunks.append(self.chunk(u.index, e.text, e.finish_reason, lp))
        return chunks

    def finish_chunks(self, index: int, finish_reason: str) -> list[str]:
        return [self.chunk(index, "", finish_reason)]
