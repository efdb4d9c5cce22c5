"""The requests of the HTTP contract: OpenAI Completions and Chat Completions, with this server's
extensions, and vLLM's tokenize and detokenize (their answers: responses.py).

The edge validates (bounds live here, errors name the field); the engine trusts what passes."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# Every list has a length bound and stops at its first bad item (fail_fast): a long list of bad
# items otherwise costs one error object per item, per union branch (480 k for 160 k empty prompts:
# seconds of the event loop for a 480 KB body).
MAX_PROMPTS = 1024  # prompts in one request (prompts x n is bounded again by the server's MAX_N)
MAX_PROMPT_TOKEN_IDS = 2**17  # token ids in one prompt: more than any served context
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64


def bounded_list(item, max_length: int):
    return Annotated[list[item], Field(min_length=1, max_length=max_length, fail_fast=True)]


Text = Annotated[str, Field(min_length=1)]
TokenIds = bounded_list(Annotated[int, Field(ge=0)], MAX_PROMPT_TOKEN_IDS)
Prompt = Text | bounded_list(Text, MAX_PROMPTS) | TokenIds | bounded_list(TokenIds, MAX_PROMPTS)
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS, fail_fast=True)] | None


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """The fields that completions and chat completions share: sampling, stops, streaming, and this
    server's extensions."""

    model_config = ConfigDict(extra="ignore")  # unknown fields are accepted and ignored

    model: str | None = None
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0: greedy (the default)")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    stop: Stop = Field(default_factory=list, description=f"up to {MAX_STOP_STRINGS} strings of 1 to {MAX_STOP_CHARS} "
                                                          "characters")
    seed: int | None = Field(None, ge=-(2**63), lt=2**63, description="same seed and parameters: same output")
    stream: bool = False
    stream_options: StreamOptions | None = None
    # extensions
    speculative: bool | None = Field(None, description="Medusa speculation; default: on when heads are loaded")
    acceptance: Literal["exact", "typical"] = Field(
        "exact", description="exact: distribution-preserving; typical: Medusa's, faster, NOT distribution-preserving")
    typical_epsilon: float = Field(0.09, gt=0.0, le=1.0)
    typical_delta: float = Field(0.3, gt=0.0, le=1.0)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str]:
        return [] if stop is None else [stop] if isinstance(stop, str) else stop

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> GenerationRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(GenerationRequest):
    prompt: Prompt
    max_tokens: int = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts, each a string or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [p]
        return list(p)

    @property
    def alternatives(self) -> int | None:
        """None: no log-probs; k: each token's log-prob and its k most likely alternatives."""
        return self.logprobs


# ---- chat ----------------------------------------------------------------------------------------

MAX_MESSAGES = 1024
MAX_CHAT_TOP_LOGPROBS = 20


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type != "text":
            raise ValueError(f"content part type {self.type!r} is not supported: only 'text' parts")
        if self.text is None:
            raise ValueError("a 'text' content part needs its text")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, ...

    role: Literal["system", "user", "assistant"]
    content: str | Annotated[list[ContentPart], Field(min_length=1, max_length=MAX_MESSAGES, fail_fast=True)]

    def text(self) -> str:
        """The content as one string (text parts joined, as OpenAI does)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str


class ChatCompletionRequest(GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES, fail_fast=True)]
    max_tokens: int | None = Field(None, ge=0, description="default: as many as the context leaves, up to the "
                                                           "server's limit")
    max_completion_tokens: int | None = Field(None, ge=0, description="OpenAI's newer name of max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list | None = Field(None, description="not supported: a request with tools gets 400")
    tool_choice: str | dict | None = Field(None, description="not supported, except \"none\"")

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, value: ResponseFormat | None) -> ResponseFormat | None:
        if value is not None and value.type != "text":
            raise ValueError(f"{value.type!r} is not supported: only 'text'")
        return value

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list | None) -> list | None:
        if value:
            raise ValueError("tools are not supported by this server")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, value: str | dict | None) -> str | dict | None:
        if value not in (None, "none"):
            raise ValueError("not supported by this server (tools are not)")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs to be true")
        return value

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        other = info.data.get("max_tokens")
        if value is not None and other is not None and value != other:
            raise ValueError(f"differs from max_tokens ({other}): give one of them")
        return value

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat(self) -> list[dict[str, str]]:
        """The messages as a chat template takes them."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    @property
    def echo(self) -> bool:
        return False

    @property
    def alternatives(self) -> int | None:
        """None: no log-probs; k: each token's log-prob and its k most likely alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None


# ---- tokenizing (vLLM's shapes) -------------------------------------------------------------------


class TokenizeRequest(BaseModel):
    """A prompt, or messages rendered by the chat template; exactly one of them."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES, fail_fast=True)] | None = None
    add_special_tokens: bool | None = Field(None, description="default: true for a prompt; for messages, true "
                                                              "unless the template writes them itself")
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_PROMPT_TOKEN_IDS, fail_fast=True)]
