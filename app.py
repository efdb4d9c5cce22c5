"""The HTTP process: an app factory (tests build it with their own settings) and `python app.py`,
which serves it with uvicorn. The routes are server/routes.py; the engine runs in a process of its
own (batch_processor.py starts it and talks to it; engine/ is never imported here)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from batch_processor import DynamicBatcher, Loader, LoadError
from config.settings import Settings, configure_logging, settings_from_command_line
from engine.messages import ServedInfo
from server.chat import chat_template
from server.errors import BodyLimit, add_error_handlers
from server.generation import Limits, max_prompt_chars
from server.metrics import ServiceMetrics
from server.routes import add_demo_page, api_router, document_bodies
from server.security import make_limiter
from server.state import ServiceState

log = logging.getLogger("medusa")


def create_app(settings: Settings, loader: Loader | None = None,
               on_engine_lost: Callable[[str], None] | None = None) -> FastAPI:
    """The service; `loader` builds what is served, in the engine process (so it must pickle: a
    module-level function; None: engine.serving.load_served). `on_engine_lost(reason)` is called once
    if the model fails to load or the engine process exits while serving (`python app.py` then stops
    the server and exits non-zero, so that a process manager or the `deepspeed` launcher restarts or
    stops the whole service; without it /health stays 503 with the reason)."""
    def engine_exited() -> None:
        if on_engine_lost is not None:
            on_engine_lost("the engine process exited while serving; see the log above")

    metrics = ServiceMetrics()
    state = ServiceState(settings, metrics, DynamicBatcher(settings, loader, metrics, on_exit=engine_exited))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(load(state, on_engine_lost))
        yield
        task.cancel()
        await state.batcher.stop()  # also stops a load still running
        state.tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="Medusa completions and chat", lifespan=lifespan)
    app.state.service, app.state.limiter = state, make_limiter(settings)
    add_error_handlers(app)
    app.include_router(api_router(settings, app.state.limiter))
    document_bodies(app, settings)
    add_demo_page(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    if settings.cors_origins:  # off unless configured: browsers then only call it from its own pages
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


async def load(state: ServiceState, on_engine_lost: Callable[[str], None] | None) -> None:
    """Start the engine process; once it has loaded the model, what the routes need to serve it."""
    try:
        served = await state.batcher.start()
    except LoadError as e:
        state.load_error = str(e)
        if on_engine_lost is not None:
            on_engine_lost(str(e))
        return
    settings = state.settings
    state.limits = await state.offload(limits_of, served, settings)
    state.chat_template = await state.offload(chat_template, settings.chat_template, served.tokenizer,
                                              settings.model_name)
    state.served = served
    log.info("serving %s on %s", settings.model_id(), served.device)


def limits_of(served: ServedInfo, settings: Settings) -> Limits:
    return Limits(served.max_context, settings.max_tokens_limit, settings.max_n, served.vocab_size,
                  served.speculative, max_prompt_chars(served.tokenizer, served.max_context))


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGINT/SIGTERM, which stop new connections and give requests in flight
    SHUTDOWN_GRACE_S to finish; then uvicorn re-raises the signal (exit status 143 for SIGTERM, which
    process managers read as a clean stop). A model that fails to load, or an engine process that
    exits while serving, stops the server: status 1 (under the `deepspeed` launcher, which then stops
    the other ranks too)."""
    settings = settings_from_command_line(argv)
    if settings.rank > 0:  # a tensor-parallel rank under a launcher: rank 0's engine process leads it
        from engine.process import follow

        return follow(settings)
    configure_logging(settings)
    import uvicorn

    from server.connections import uvicorn_config

    lost: list[str] = []

    def stop(reason: str) -> None:
        lost.append(reason)
        server.should_exit = True

    app = create_app(settings, on_engine_lost=stop)
    server = uvicorn.Server(uvicorn_config(app, settings))
    server.run()
    if lost:
        raise SystemExit(f"exiting: {lost[0]}")


if __name__ == "__main__":
    main()
