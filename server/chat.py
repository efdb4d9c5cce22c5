"""OpenAI chat completions: the messages rendered by a chat template, then the same Generation as a
text completion (engine requests, limits, metrics, the stream), answered in the chat shape.

Templates, in this order: the CHAT_TEMPLATE setting (a Jinja file, or a built-in name); the
tokenizer's own; FastChat's `vicuna_v1.1` for a model whose name says vicuna. A model with none of
them answers chat requests with a 400 that says how to set one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from batch_processor import Update
from config.chat_templates import BUILT_IN, VICUNA_V1_1
from server.generation import BadRequest, ChoiceState, Generation, Limits, check_fits
from server.protocol import ChatCompletionRequest
from server.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    TokenLogprob,
    TopLogprob,
)


class NoChatTemplate(BadRequest):
    def __init__(self) -> None:
        super().__init__("this model has no chat template: start the server with CHAT_TEMPLATE set to a Jinja file or "
                         f"one of {', '.join(BUILT_IN)}", "messages")


@dataclass(frozen=True)
class ChatTemplate:
    name: str  # a built-in name, a file, or "the tokenizer's"
    source: str | None  # Jinja; None: the tokenizer's own

    def render(self, tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = True
               ) -> str:
        try:
            return tokenizer.apply_chat_template(messages, chat_template=self.source, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        except Exception as e:  # the template's own raise_exception, or a template that fails on these messages
            raise BadRequest(f"the chat template ({self.name}) cannot render these messages: {e}", "messages") from None

    def ids(self, tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = True,
            add_special_tokens: bool | None = None) -> tuple[str, list[int]]:
        """The rendered text and its token ids; by default the tokenizer adds its special tokens (BOS)
        unless the template wrote them itself."""
        text = self.render(tokenizer, messages, add_generation_prompt)
        if add_special_tokens is None:
            add_special_tokens = not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))
        return text, tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def chat_template(setting: str, tokenizer: PreTrainedTokenizerBase, model_name: str) -> ChatTemplate | None:
    """The template chat requests are rendered with (see the module's doc); None: the model has none."""
    if setting in BUILT_IN:
        return ChatTemplate(setting, BUILT_IN[setting])
    if setting:
        return ChatTemplate(setting, Path(setting).expanduser().read_text())
    if tokenizer.chat_template:
        return ChatTemplate("the tokenizer's", None)
    if "vicuna" in model_name.lower():
        return ChatTemplate("vicuna_v1.1", VICUNA_V1_1)
    return None


def token_logprobs(text: str, item: tuple[float, list[tuple[int, float]]], alternatives: dict[str, float]
                   ) -> TokenLogprob:
    top = [TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in alternatives.items()]
    return TokenLogprob(token=text, logprob=item[0], bytes=list(text.encode()), top_logprobs=top)


class ChatCompletion(Generation):
    """One chat completion in flight, its messages rendered by `template` (None: the model has none)."""

    kind = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    def __init__(self, req: ChatCompletionRequest, *args, template: ChatTemplate | None, **kwargs):
        self.template = template
        super().__init__(req, *args, **kwargs)

    def prompts_of(self, req: ChatCompletionRequest, tokenizer: PreTrainedTokenizerBase, limits: Limits
                   ) -> tuple[list[tuple[str, list[int]]], int]:
        """One prompt: the messages rendered; max_tokens by default all that the context leaves (at
        most the server's limit)."""
        if self.template is None:
            raise NoChatTemplate()
        if sum(len(m["content"]) for m in req.chat()) > limits.max_prompt_chars:  # refused before rendering
            raise BadRequest(f"the messages are longer than the context of {limits.max_context} tokens can hold",
                             "messages")
        text, ids = self.template.ids(tokenizer, req.chat())
        asked = req.token_limit
        if asked is not None and asked > limits.max_tokens:
            raise BadRequest(f"max_tokens is {asked}; this server allows at most {limits.max_tokens}", "max_tokens")
        if req.n > limits.max_n:
            raise BadRequest(f"n={req.n} choices; at most {limits.max_n} per request", "n")
        max_tokens = asked if asked is not None else max(0, min(limits.max_tokens, limits.max_context - len(ids)))
        check_fits(ids, max_tokens, limits, "messages")
        return [(text, ids)], max_tokens

    def logprobs(self, c: ChoiceState, start: int, end: int) -> ChatLogprobs | None:
        """The chat shape of the log-probs of tokens[start:end] of choice c."""
        if self.req.alternatives is None:
            return None
        texts = c.token_texts(self.tokenizer, start, end)
        return ChatLogprobs(content=[token_logprobs(t, item, self.top_texts(item[1]))
                                     for t, item in zip(texts, c.logprobs[start:end])])

    def response(self) -> ChatCompletionResponse:
        choices = [ChatChoice(index=i, message=ChatResponseMessage(content=c.text), finish_reason=c.finish_reason,
                              logprobs=self.logprobs(c, 0, len(c.tokens)))
                   for i, c in enumerate(self.choices)]
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model_id, choices=choices,
                                      usage=self.usage(), metrics=self.run_metrics())

    def chunk(self, index: int, delta: ChatDelta, finish_reason: str | None = None,
              logprobs: ChatLogprobs | None = None) -> str:
        choice = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)
        return self.envelope([choice])

    def opening_chunks(self, scored: bool) -> list[str]:
        """The first delta of every choice carries the role."""
        return [self.chunk(i, ChatDelta(role="assistant", content="")) for i in range(len(self.choices))]

    async def update_chunks(self, u: Update, offset: int) -> list[str]:
        e, c, chunks = u.event, self.choices[u.index], []
        if e.text or e.token_ids:
            start = len(c.tokens) - len(e.token_ids)
            lp = await self.offload(self.logprobs, c, start, len(c.tokens)) if self.req.logprobs else None
            chunks.append(self.chunk(u.index, ChatDelta(content=e.text), None, lp))
        if e.finish_reason:
            chunks += self.finish_chunks(u.index, e.finish_reason)
        return chunks

    def finish_chunks(self, index: int, finish_reason: str) -> list[str]:
        return [self.chunk(index, ChatDelta(), finish_reason)]
