"""The engine process's entry points: `serve` (started by the HTTP process: load, say what was
loaded, then run the loop) and `follow` (a tensor-parallel rank other than 0).

Why a process and not a thread of the HTTP process: there the engine thread and the event loop
share the GIL, and every streamed chunk's Python (SSE, JSON, HTTP) lengthened the engine's steps by
2-40% at one streaming client on a 2-core CPU (issue 7). vLLM V1 runs its EngineCore apart from the
API server for the same reason."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

from config.settings import Settings, configure_logging
from engine.adaptive import TreeChooser
from engine.core import EngineCore
from engine.lockstep import Lockstep
from engine.messages import LoadFailed
from engine.serving import Served, load_served

log = logging.getLogger("medusa.engine")


def serve(loader: Callable[[Settings], Served] | None, settings: Settings, inbox: multiprocessing.Queue,
          outbox: Connection) -> None:
    """The engine process's main (tensor-parallel rank 0 when there are several): load (with `loader`,
    else load_served), say what was loaded (ServedInfo) or why not, then loop."""
    configure_logging(settings)
    os.setpgrp()  # out of the server's process group: Ctrl-C there lets the HTTP process drain, then stop this one
    threading.Thread(target=_exit_with_parent, name="parent-watch", daemon=True).start()
    try:
        served, lockstep = _load(loader or load_served, settings)
    except Exception as e:
        log.exception("model failed to load")
        outbox.send(LoadFailed(f"model failed to load: {e}"))
        return
    outbox.send(served.info())
    try:
        EngineCore(served.engine, settings.max_wait_ms, inbox, outbox, lockstep).run()
    except BaseException:  # the HTTP process sees the pipe close and fails what was in flight
        log.exception("the engine loop stopped")
        raise SystemExit(1) from None


def follow(settings: Settings, loader: Callable[[Settings], Served] = load_served) -> None:
    """A tensor-parallel rank other than 0 (`deepspeed --num_gpus N app.py` starts one per GPU): no
    HTTP; it loads its shard and runs the rounds that rank 0 shares, until rank 0 stops."""
    configure_logging(settings)
    served, lockstep = _load(loader, settings)
    EngineCore(served.engine, settings.max_wait_ms, None, None, lockstep).run()


def _load(loader: Callable[[Settings], Served], settings: Settings) -> tuple[Served, Lockstep | None]:
    lockstep = Lockstep(settings) if settings.world_size > 1 else None
    served = loader(settings)
    if lockstep is not None and served.engine.chooser is not None:  # each rank timed its own steps:
        costs = lockstep.share(served.engine.chooser.costs)  # all take rank 0's, so that all choose alike
        served.engine.chooser = TreeChooser(served.tree, costs)
    return served, lockstep


def _exit_with_parent() -> None:
    """Whatever this process is doing (loading, stepping, waiting), it ends when the HTTP process does:
    an orphan would hold the model's memory (a GPU's) for nothing."""
    multiprocessing.connection.wait([multiprocessing.parent_process().sentinel])
    os._exit(1)
