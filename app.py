"""The HTTP service: an app factory (tests build it with their own settings) and `python app.py`,
which serves it with uvicorn. Routes: POST /v1/completions (JSON or SSE), GET /health, /v1/models,
/info, /metrics, and the demo page at /."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from slowapi.errors import RateLimitExceeded
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from batch_processor import DynamicBatcher, EngineFailure, LoadError, QueueFull, RequestTimeout
from chat import ChatCompletion, NoChatTemplate, chat_template
from completions import BadRequest, Completion, Generation, Limits, max_prompt_chars
from engine_core import configure_logging, follow
from metrics import ServiceMetrics
from protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                      DetokenizeRequest, DetokenizeResponse, ErrorResponse, GenerationRequest, ModelCard, ModelList,
                      TokenizeRequest, TokenizeResponse, error_body)
from security import key_guard, make_limiter
from serving import Served, ServedInfo, load_served
from settings import Settings, settings_from_command_line

log = logging.getLogger("medusa")
Body = TypeVar("Body", bound=BaseModel)
STATIC = Path(__file__).with_name("static")
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 405, 413, 429, 500, 503, 504)}
FIELD_SHAPES = {  # what union fields accept, for errors that pydantic reports per union branch
    "prompt": "must be a non-empty string, or a non-empty list of non-empty strings, of token ids (>= 0), or of "
              "non-empty lists of token ids",
    "stop": "must be a string or a list of strings",
}


def error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


class BodyLimit:
    """413 for bodies over the limit: by Content-Length up front, or as a body streams in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body over {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            return await error(413, message)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, message)  # FastAPI re-raises HTTPExceptions met while reading
            return msg

        await self.app(scope, counted, send)


def create_app(settings: Settings, loader: Callable[[Settings], Served] = load_served,
               on_engine_lost: Callable[[str], None] | None = None) -> FastAPI:
    """The service; `loader` builds what is served, in the engine process (so it must pickle: a
    module-level function). `on_engine_lost(reason)` is called once if the model fails to load or the
    engine process exits while serving (`python app.py` then stops the server and exits non-zero, so
    that a process manager or the `deepspeed` launcher restarts or stops the whole service; without it
    /health stays 503 with the reason)."""
    metrics = ServiceMetrics()
    state: dict = {"served": None, "limits": None, "batcher": None, "load_error": None, "chat_template": None}
    # The tokenizer's work (tokenising prompts, decoding log-prob texts and large echoes) runs on one
    # thread of its own: never on the event loop, and never two calls at once (a fast tokenizer is
    # not safe to use from several threads).
    tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="tokenizer")

    async def offload(fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(tokenizer_thread, functools.partial(fn, *args))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        def engine_exited() -> None:
            if on_engine_lost is not None:
                on_engine_lost("the engine process exited while serving; see the log above")

        batcher = state["batcher"] = DynamicBatcher(settings, loader, metrics, on_exit=engine_exited)

        async def load():
            try:
                served = await batcher.start()
            except LoadError as e:
                state["load_error"] = str(e)
                if on_engine_lost is not None:
                    on_engine_lost(str(e))
                return
            state["limits"] = await offload(limits_of, served, settings)
            state["chat_template"] = await offload(chat_template, settings.chat_template, served.tokenizer,
                                                   settings.model_name)
            state["served"] = served
            log.info("serving %s on %s", settings.model_id(), served.device)

        task = asyncio.create_task(load())
        yield
        task.cancel()
        await batcher.stop()  # also stops a load still running
        tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="Medusa completions and chat", lifespan=lifespan, responses=ERRORS)
    app.state.settings, app.state.metrics, app.state.serving = settings, metrics, state
    app.state.limiter = make_limiter(settings)
    add_error_handlers(app)
    add_routes(app, settings, state, metrics, offload)
    document_bodies(app, settings)
    add_demo_page(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:  # off unless configured: browsers then only call it from its own pages
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


def limits_of(served: ServedInfo, settings: Settings) -> Limits:
    return Limits(served.max_context, settings.max_tokens_limit, settings.max_n, served.vocab_size,
                  served.speculative, max_prompt_chars(served.tokenizer, served.max_context))


def document_bodies(app: FastAPI, settings: Settings) -> None:
    """The OpenAPI document declares the request bodies that routes parse themselves (see parse_body),
    with this server's own limits on max_tokens and n (the context and the vocabulary are the
    model's, known once it has loaded: those stay 400s)."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schemas = generate()["components"]["schemas"]
            for model in BODIES.values():
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
            fields = schemas["CompletionRequest"]["properties"]
            fields["max_tokens"]["maximum"] = settings.max_tokens_limit
            fields["n"]["maximum"] = settings.max_n
        return app.openapi_schema

    app.openapi = openapi


BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
          "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest}  # route -> the body it parses


def body_schema(route: str) -> dict:
    """The `openapi_extra` of a route that parses its body itself."""
    ref = {"$ref": f"#/components/schemas/{BODIES[route].__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


async def parse_body(request: Request, model: type[Body]) -> tuple[Body | None, JSONResponse | None]:
    """The body as `model`, parsed and validated in one pass by pydantic (in Rust, from the bytes), or
    the 400 that says why not. Routes call this themselves, after the API key and the rate limit, so
    that refused bodies count against the limit too (and get its headers); every list in the schemas
    is bounded and fails fast, so that no body under MAX_BODY_BYTES holds the event loop for long."""
    try:
        return model.model_validate_json(await request.body()), None
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        return None, invalid_request([{**err, "loc": ("body", *err["loc"])} for err in errors])


def invalid_request(errors: list[dict]) -> JSONResponse:
    """400 for pydantic's errors, naming the field of the first that says most."""
    def wrong_shape(e: dict) -> bool:
        return e.get("type", "").endswith(("_type", "_parsing"))

    # a union field is reported once per branch: the branch that matched the input's shape says why
    first = next((e for e in errors if not wrong_shape(e)), errors[0])
    if first.get("type") == "json_invalid":
        return error(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}")
    loc = [str(p) for p in first.get("loc", ())]
    param = loc[1] if len(loc) > 1 and loc[0] == "body" else None  # the field, not the union branch
    message = FIELD_SHAPES.get(param) if len(loc) > 2 and wrong_shape(first) else None
    message = message or str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return error(400, f"{param}: {message}" if param else message, param)


def add_error_handlers(app: FastAPI) -> None:
    """Every error in the OpenAI shape; no stack trace ever reaches a client."""

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        return invalid_request(list(exc.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException):
        messages = {404: "no such route", 405: "method not allowed"}
        return error(exc.status_code, messages.get(exc.status_code, str(exc.detail)), headers=exc.headers)

    @app.exception_handler(RateLimitExceeded)
    async def rate_limited(request: Request, exc: RateLimitExceeded):
        response = error(429, f"rate limit exceeded: {exc.detail}; retry after the time in Retry-After")
        return request.app.state.limiter._inject_headers(response, request.state.view_rate_limit)  # X-RateLimit-*

    @app.exception_handler(Exception)
    async def unexpected(_, exc: Exception):
        log.exception("unhandled error")
        return error(500, "internal server error")


def add_routes(app: FastAPI, settings: Settings, state: dict, metrics: ServiceMetrics, offload: Callable) -> None:
    """/health and /metrics are open; with API keys, /v1/* and /info need one (and only then does
    the OpenAPI document declare Bearer security)."""
    keyed = [Depends(key_guard(settings))] if settings.keys() else []

    def ready():
        if state["served"] is None:
            return None, error(503, state["load_error"] or "the model is loading", headers={"Retry-After": "5"})
        if state["batcher"].dead:
            return None, error(503, "the engine has stopped; see the server log")
        return state["served"], None

    @app.get("/health", responses=ERRORS)
    async def health():
        _, not_ready = ready()
        return not_ready or {"status": "ok"}

    @app.get("/v1/models", response_model=ModelList, dependencies=keyed)
    async def models():
        return ModelList(data=[ModelCard(id=settings.model_id(), created=int(time.time()))])

    @app.get("/info", responses=ERRORS, dependencies=keyed)
    async def info():
        served, not_ready = ready()
        if not_ready:
            return not_ready
        batcher = state["batcher"]
        return {
            "model": settings.model_id(), "model_path": settings.model_name, "weights": served.weights,
            "heads": settings.heads(),
            "num_heads": served.num_heads, "tree": served.tree.describe(), "adaptive_tree": served.adaptive,
            "tree_in_use": batcher.tree_in_use, "device": served.device,
            "dtype": served.dtype, "deepspeed": served.deepspeed, "threads": served.threads,
            "cuda_graphs": served.cuda_graphs, "engine_pid": batcher.pid, "tp_size": settings.resolved_tp_size(),
            "max_batch_size": served.max_batch_size, "max_wait_ms": settings.max_wait_ms,
            "queue_size": settings.queue_size, "max_context": served.max_context,
            "max_tokens_limit": settings.max_tokens_limit, "running": batcher.running,
            "waiting": batcher.waiting, "steps_by_batch_size": dict(sorted(batcher.batch_sizes.items())),
            "rate_limit": settings.rate_limit or None, "api_keys": bool(settings.keys()),
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    def served_model(body) -> JSONResponse | None:
        if body.model is not None and body.model != settings.model_id():
            return error(404, f"model {body.model!r} is not served here; this server serves {settings.model_id()!r}",
                         "model")
        return None

    async def generate(request: Request, body: GenerationRequest, make: Callable[..., Generation]) -> Response:
        """What completions and chat completions share, from a parsed body to the answer or stream."""
        served, not_ready = ready()
        if not_ready or (not_ready := served_model(body)):
            return not_ready
        try:
            generation = await offload(make, body, settings.model_id(), served.tokenizer, state["limits"],
                                       state["batcher"], metrics, offload, settings.request_timeout_s)
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
            cancel = BackgroundTask(state["batcher"].cancel, ticket) if ticket else None  # also if never started
            return EventSourceResponse(generation.sse(ticket), sep="\n", ping=15, background=cancel,
                                       shutdown_grace_period=settings.shutdown_grace_s)
        try:
            await until_done_or_disconnected(generation.updates(ticket), request)
        except EngineFailure as e:
            return error(500, str(e))
        except RequestTimeout:
            return error(504, generation.timeout_message())
        return Response(await offload(generation.response_json), media_type="application/json")

    # `request` is also what slowapi's decorator reads; it writes its headers into the Response returned
    async def completions(request: Request):
        body, invalid = await parse_body(request, CompletionRequest)
        return invalid or await generate(request, body, Completion)

    async def chat_completions(request: Request):
        body, invalid = await parse_body(request, ChatCompletionRequest)
        return invalid or await generate(request, body, functools.partial(ChatCompletion,
                                                                          template=state["chat_template"]))

    if app.state.limiter is not None:  # slowapi's decorator, not its middleware (which breaks streaming); one
        shared = app.state.limiter.shared_limit(settings.rate_limit, scope="generate")  # budget for both routes
        completions, chat_completions = shared(completions), shared(chat_completions)
    event = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}
    streamed = {200: {"content": {"text/event-stream": {"schema": event}},  # the schema of each event
                      "description": "JSON; with stream=true, server-sent events whose data is a JSON chunk, "
                                     "the last one [DONE]"}}
    app.post("/v1/completions", response_model=CompletionResponse, responses={**ERRORS, **streamed},
             dependencies=keyed, openapi_extra=body_schema("/v1/completions"))(completions)
    app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={**ERRORS, **streamed},
             dependencies=keyed, openapi_extra=body_schema("/v1/chat/completions"))(chat_completions)
    add_tokenize_routes(app, settings, state, offload, keyed, ready, served_model)


def add_tokenize_routes(app: FastAPI, settings: Settings, state: dict, offload: Callable, keyed: list,
                        ready: Callable, served_model: Callable) -> None:
    """vLLM's POST /tokenize (a prompt, or messages through the chat template) and /detokenize, so
    that clients can count tokens as the server does."""

    def tokenize(body: TokenizeRequest, served: ServedInfo) -> TokenizeResponse:
        tokenizer, limits = served.tokenizer, state["limits"]
        if body.messages is not None:
            template = state["chat_template"]
            if template is None:
                raise NoChatTemplate()
            _, ids = template.ids(tokenizer, [{"role": m.role, "content": m.text()} for m in body.messages],
                                  body.add_generation_prompt, body.add_special_tokens)
        elif len(body.prompt) > limits.max_prompt_chars:
            raise BadRequest(f"prompt is longer than the context of {limits.max_context} tokens can hold", "prompt")
        else:
            ids = tokenizer(body.prompt, add_special_tokens=body.add_special_tokens is not False)["input_ids"]
        strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=served.max_context, tokens=ids, token_strs=strs)

    def detokenize(body: DetokenizeRequest, served: ServedInfo) -> DetokenizeResponse:
        if any(t >= served.vocab_size for t in body.tokens):
            raise BadRequest(f"token ids must be in [0, {served.vocab_size})", "tokens")
        return DetokenizeResponse(prompt=served.tokenizer.decode(body.tokens))

    def route(model: type[BaseModel], work: Callable) -> Callable:
        async def endpoint(request: Request):
            body, invalid = await parse_body(request, model)
            if invalid:
                return invalid
            served, not_ready = ready()
            if not_ready or (not_ready := served_model(body)):
                return not_ready
            try:
                answer = await offload(work, body, served)
            except BadRequest as e:
                return error(400, str(e), e.param)
            return Response(answer.model_dump_json(), media_type="application/json")

        return endpoint

    app.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS, dependencies=keyed,
             openapi_extra=body_schema("/tokenize"))(route(TokenizeRequest, tokenize))
    app.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS, dependencies=keyed,
             openapi_extra=body_schema("/detokenize"))(route(DetokenizeRequest, detokenize))


def add_demo_page(app: FastAPI) -> None:
    """The page at / and its files under /static (a mount at "/" would shadow the API's 404s and 405s)."""
    page = STATIC / "index.html"
    if not page.exists():
        return
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def demo():
        return FileResponse(page)


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


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGINT/SIGTERM, which stop new connections and give requests in flight
    SHUTDOWN_GRACE_S to finish; then uvicorn re-raises the signal (exit status 143 for SIGTERM, which
    process managers read as a clean stop). A model that fails to load, or an engine process that
    exits while serving, stops the server: status 1 (under the `deepspeed` launcher, which then stops
    the other ranks too)."""
    settings = settings_from_command_line(argv)
    if settings.rank > 0:  # a tensor-parallel rank under a launcher: rank 0's engine process leads it
        return follow(settings)
    configure_logging(settings)
    import uvicorn

    lost: list[str] = []

    def stop(reason: str) -> None:
        lost.append(reason)
        server.should_exit = True

    app = create_app(settings, on_engine_lost=stop)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                           timeout_graceful_shutdown=settings.shutdown_grace_s + 1))
    server.run()
    if lost:
        raise SystemExit(f"exiting: {lost[0]}")


if __name__ == "__main__":
    main()
