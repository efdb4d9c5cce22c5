"""The routes of the HTTP contract, as one APIRouter: POST /v1/completions and /v1/chat/completions
(JSON, or SSE with stream=true), /tokenize and /detokenize; GET /health, /v1/models, /info and
/metrics; the demo page at /. With API keys, /v1/*, /tokenize, /detokenize and /info need one (and
only then does the OpenAPI document declare Bearer security); /health and /metrics stay open."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from slowapi import Limiter
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from batch_processor import EngineFailure, QueueFull, RequestTimeout
from config.settings import Settings
from engine.messages import ServedInfo
from server.chat import ChatCompletion, NoChatTemplate
from server.completions import Completion
from server.errors import ERRORS, error, parse_body
from server.generation import BadRequest, Generation
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerationRequest,
    TokenizeRequest,
)
from server.responses import (
    ChatCompletionResponse,
    CompletionResponse,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeResponse,
)
from server.security import key_guard
from server.state import ServiceState, service

STATIC = Path(__file__).resolve().parent.parent / "static"
BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
          "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest}  # route -> the body it parses
STREAMED = {200: {"content": {"text/event-stream": {"schema": {  # the schema of each event
    "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}},
    "description": "JSON; with stream=true, server-sent events whose data is a JSON chunk, the last one [DONE]"}}


def api_router(settings: Settings, limiter: Limiter | None) -> APIRouter:
    """The routes, with this server's key guard and its rate limit on generation."""
    keyed = [Depends(key_guard(settings))] if settings.keys() else []
    router = APIRouter(responses=ERRORS)
    add_get(router, "/health", health)
    add_get(router, "/v1/models", models, response_model=ModelList, dependencies=keyed)
    add_get(router, "/info", info, dependencies=keyed)
    add_get(router, "/metrics", prometheus, response_class=PlainTextResponse)
    generating = [completions, chat_completions]
    if limiter is not None:  # slowapi's decorator, not its middleware (which breaks streaming); one
        shared = limiter.shared_limit(settings.rate_limit, scope="generate")  # budget for both routes
        generating = [shared(route) for route in generating]
    for route, path, answer in zip(generating, BODIES, (CompletionResponse, ChatCompletionResponse)):
        router.add_api_route(path, route, methods=["POST"], response_model=answer, responses=STREAMED,
                             dependencies=keyed, openapi_extra=body_schema(path))
    for path, answer, work in (("/tokenize", TokenizeResponse, tokenize),
                               ("/detokenize", DetokenizeResponse, detokenize)):
        router.add_api_route(path, tokenizer_route(BODIES[path], work), methods=["POST"], response_model=answer,
                             dependencies=keyed, openapi_extra=body_schema(path))
    return router


def add_get(router: APIRouter, path: str, endpoint: Callable, **options) -> None:
    """GET, and HEAD (HTTP requires it of GET resources; monitors probe with it): the same answer, whose
    body the server drops. HEAD stays out of the OpenAPI document."""
    router.add_api_route(path, endpoint, methods=["GET"], **options)
    router.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False, **options)


# ---- open routes ------------------------------------------------------------------------------------


async def health(state: ServiceState = Depends(service)):
    _, not_ready = state.ready()
    return not_ready or {"status": "ok"}


async def prometheus(state: ServiceState = Depends(service)):
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")


async def models(state: ServiceState = Depends(service)):
    return ModelList(data=[ModelCard(id=state.settings.model_id(), created=int(time.time()))])


async def info(state: ServiceState = Depends(service)):
    served, not_ready = state.ready()
    if not_ready:
        return not_ready
    settings, batcher = state.settings, state.batcher
    return {
        "model": settings.model_id(), "model_path": settings.model_name, "weights": served.weights,
        "heads": settings.heads(), "num_heads": served.num_heads, "tree": served.tree, "adaptive_tree": served.adaptive,
        "tree_in_use": batcher.tree_in_use, "device": served.device,
        "dtype": served.dtype, "deepspeed": served.deepspeed, "threads": served.threads,
        "cuda_graphs": served.cuda_graphs, "engine_pid": batcher.pid, "tp_size": settings.resolved_tp_size(),
        "max_batch_size": served.max_batch_size, "max_wait_ms": settings.max_wait_ms,
        "queue_size": settings.queue_size, "max_context": served.max_context,
        "max_tokens_limit": settings.max_tokens_limit, "running": batcher.running,
        "waiting": batcher.waiting, "steps_by_batch_size": dict(sorted(batcher.batch_sizes.items())),
        "rate_limit": settings.rate_limit or None, "api_keys": bool(settings.keys()),
    }


# ---- generation -------------------------------------------------------------------------------------


# `request` is also what slowapi's decorator reads; it writes its headers into the Response returned
async def completions(request: Request):
    body, invalid = await parse_body(request, CompletionRequest)
    return invalid or await generate(request, body, Completion)


async def chat_completions(request: Request):
    body, invalid = await parse_body(request, ChatCompletionRequest)
    template = service(request).chat_template
    return invalid or await generate(request, body, functools.partial(ChatCompletion, template=template))


async def generate(request: Request, body: GenerationRequest, make: Callable[..., Generation]) -> Response:
    """What completions and chat completions share, from a parsed body to the answer or stream."""
    state = service(request)
    settings, batcher = state.settings, state.batcher
    served, not_ready = state.ready()
    if not_ready or (not_ready := served_model(settings, body)):
        return not_ready
    try:
        generation = await state.offload(make, body, settings.model_id(), served.tokenizer, state.limits, batcher,
                                         state.metrics, state.offload, settings.request_timeout_s)
        if len(generation.requests) > settings.queue_size + settings.max_batch_size:
            raise BadRequest(f"{len(generation.requests)} choices can never fit the queue and batch", "n")
        ticket = generation.submit()
    except BadRequest as e:
        return error(400, str(e), e.param)
    except QueueFull as e:
        return error(429, str(e), headers={"Retry-After": str(int(e.retry_after))})
    except EngineFailure as e:
        return error(503, str(e))
    if body.stream:
        cancel = BackgroundTask(batcher.cancel, ticket) if ticket else None  # also if never started
        return EventSourceResponse(generation.sse(ticket), sep="\n", ping=15, background=cancel,
                                   shutdown_grace_period=settings.shutdown_grace_s)
    try:
        await until_done_or_disconnected(generation.updates(ticket), request)
    except EngineFailure as e:
        return error(500, str(e))
    except RequestTimeout:
        return error(504, generation.timeout_message())
    return Response(await state.offload(generation.response_json), media_type="application/json")


def served_model(settings: Settings, body) -> JSONResponse | None:
    """404 for a `model` other than the one served."""
    if body.model is not None and body.model != settings.model_id():
        return error(404, f"model {body.model!r} is not served here; this server serves {settings.model_id()!r}",
                     "model")
    return None


async def until_done_or_disconnected(updates, http: Request, poll_s: float = 0.25) -> None:
    """Drain a completion's updates; a client that goes away cancels it (its slots free up)."""

    async def drain():
        async for _ in updates:
            pass

    task = asyncio.create_task(drain())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=poll_s)
            if not task.done() and await http.is_disconnected():
                return  # the finally cancels the drain, and with it the request's sequences
        task.result()  # re-raises EngineFailure
    finally:
        task.cancel()


# ---- tokenizing (vLLM's /tokenize and /detokenize: clients count tokens as the server does) ----------


def tokenize(state: ServiceState, body: TokenizeRequest, served: ServedInfo) -> TokenizeResponse:
    """A prompt, or messages through the chat template."""
    tokenizer, limits = served.tokenizer, state.limits
    if body.messages is not None:
        if state.chat_template is None:
            raise NoChatTemplate()
        _, ids = state.chat_template.ids(tokenizer, [{"role": m.role, "content": m.text()} for m in body.messages],
                                         body.add_generation_prompt, body.add_special_tokens)
    elif len(body.prompt) > limits.max_prompt_chars:
        raise BadRequest(f"prompt is longer than the context of {limits.max_context} tokens can hold", "prompt")
    else:
        ids = tokenizer(body.prompt, add_special_tokens=body.add_special_tokens is not False)["input_ids"]
    strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=served.max_context, tokens=ids, token_strs=strs)


def detokenize(state: ServiceState, body: DetokenizeRequest, served: ServedInfo) -> DetokenizeResponse:
    if any(t >= served.vocab_size for t in body.tokens):
        raise BadRequest(f"token ids must be in [0, {served.vocab_size})", "tokens")
    return DetokenizeResponse(prompt=served.tokenizer.decode(body.tokens))


def tokenizer_route(model: type[BaseModel], work: Callable) -> Callable:
    """A route that parses `model` and answers with work(state, body, served) on the tokenizer's thread."""

    async def endpoint(request: Request):
        body, invalid = await parse_body(request, model)
        if invalid:
            return invalid
        state = service(request)
        served, not_ready = state.ready()
        if not_ready or (not_ready := served_model(state.settings, body)):
            return not_ready
        try:
            answer = await state.offload(work, state, body, served)
        except BadRequest as e:
            return error(400, str(e), e.param)
        return Response(answer.model_dump_json(), media_type="application/json")

    return endpoint


# ---- the OpenAPI document and the demo page -----------------------------------------------------------


def body_schema(route: str) -> dict:
    """The `openapi_extra` of a route that parses its body itself."""
    ref = {"$ref": f"#/components/schemas/{BODIES[route].__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def document_bodies(app: FastAPI, settings: Settings) -> None:
    """The OpenAPI document declares the request bodies that routes parse themselves (see parse_body),
    with this server's own limits on max_tokens and n (the context and the vocabulary are the
    model's, known once it has loaded: those stay 400s)."""
    generate_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schemas = generate_openapi()["components"]["schemas"]
            for model in BODIES.values():
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
            fields = schemas["CompletionRequest"]["properties"]
            fields["max_tokens"]["maximum"] = settings.max_tokens_limit
            fields["n"]["maximum"] = settings.max_n
        return app.openapi_schema

    app.openapi = openapi


def add_demo_page(app: FastAPI) -> None:
    """The page at / and its files under /static (a mount at "/" would shadow the API's 404s and 405s)."""
    page = STATIC / "index.html"
    if not page.exists():
        return
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def demo():
        return FileResponse(page)
