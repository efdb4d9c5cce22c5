"""The answers of the HTTP contract: completion and chat completion responses and their SSE chunks,
vLLM's tokenize and detokenize answers, the model list, and the error shape with its table of types."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


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


class GenerationResponse(BaseModel):
    """What a completion and a chat completion answer alike; each narrows `object` and `choices`."""

    id: str
    object: str
    created: int
    model: str
    choices: list
    usage: Usage | None = None
    metrics: Metrics | None = None


class CompletionResponse(GenerationResponse):
    object: Literal["text_completion"] = "text_completion"
    choices: list[Choice]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(GenerationResponse):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


# ---- tokenizing (vLLM's shapes) -------------------------------------------------------------------


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


# ---- streaming: one SSE event's JSON each -----------------------------------------------------------


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: Logprobs | None
    finish_reason: Literal["stop", "length"] | None


class ChatDelta(BaseModel):
    """Only the fields set are sent: the role first, then content, then {} with the finish reason."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class GenerationChunk(BaseModel):
    """One SSE event of a stream, sent with the fields that were set (exclude_unset): `usage` is null in
    every chunk but the last when the client asked for usage (stream_options), and absent otherwise."""

    id: str
    object: Literal["text_completion", "chat.completion.chunk"]
    created: int
    model: str
    choices: list[CompletionChunkChoice] | list[ChatChunkChoice]
    usage: Usage | None = None
    metrics: Metrics | None = None

    def json(self) -> str:
        return self.model_dump_json(exclude_unset=True)


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
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
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
