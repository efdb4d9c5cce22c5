"""What the routes of one app share: its settings and metrics, the batcher, the tokenizer's thread, and
what is known once the engine process has loaded the model."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse

from batch_processor import DynamicBatcher
from config.settings import Settings
from engine.messages import ServedInfo
from server.chat import ChatTemplate
from server.errors import error
from server.generation import Limits
from server.metrics import ServiceMetrics


@dataclass
class ServiceState:
    settings: Settings
    metrics: ServiceMetrics
    batcher: DynamicBatcher
    # The tokenizer's work (tokenising prompts, decoding log-prob texts and large echoes) runs on one
    # thread of its own: never on the event loop, and never two calls at once (a fast tokenizer is
    # not safe to use from several threads).
    tokenizer_thread: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="tokenizer"))
    served: ServedInfo | None = None  # set once loaded, with the two below
    limits: Limits | None = None
    chat_template: ChatTemplate | None = None
    load_error: str | None = None

    async def offload(self, fn: Callable, *args):
        """fn(*args) on the tokenizer's thread, awaited."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_thread, functools.partial(fn, *args))

    def ready(self) -> tuple[ServedInfo | None, JSONResponse | None]:
        """What is served, or the 503 that says why nothing is."""
        if self.served is None:
            return None, error(503, self.load_error or "the model is loading", headers={"Retry-After": "5"})
        if self.batcher.dead:
            return None, error(503, "the engine has stopped; see the server log")
        return self.served, None


def service(request: Request) -> ServiceState:
    """The app's state (a FastAPI dependency)."""
    return request.app.state.service
