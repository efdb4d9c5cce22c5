"""The OpenAI Completions request and response, with this server's extensions, and the error shape.

The edge validates (bounds live here, errors name the field); the engine trusts what passes."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields are accepted and ignored

    model: str | None = None
    prompt: Prompt
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0: greedy (the default)")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    stop: Stop = Field(default_factory=list, description=f"up to {MAX_STOP_STRINGS} strings of 1 to {MAX_STOP_CHARS} "
                                                          "characters")
    seed: int | None = Field(None, ge=-(2**63), lt=2**63, description="same seed and parameters: same output")
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
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
    def _stream_options_need_stream(self) -> CompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts, each a string or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [p]
        return list(p)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class Logprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class Choice(BaseModel):
    index: int
    text: str
    logprobs: Logprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Metrics(BaseModel):
    decode_steps: int
    accepted_tokens_per_step: float | None = Field(
        description="tokens emitted by decode steps / decode steps (the prefill token excluded); 1.0 for standard"
    )
    ttft_ms: float | None
    total_ms: float
    engine_ms: float = Field(description="the longest time one of its sequences spent in the engine, from admission "
                                         "to its last token (total_ms less this: queueing, HTTP and streaming)")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None
    metrics: Metrics | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "param": param, "code": status}}


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "medusa-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
