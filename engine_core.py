"""The engine loop, in a process of its own. It loads the model, then loops: take the HTTP process's
requests and cancels, admit waiting requests FIFO into free batch slots (continuous batching), step
the batch, and send the round's events back as one Report.

Why a process and not a thread of the HTTP process: there the engine thread and the event loop
share the GIL, and every streamed chunk's Python (SSE, JSON, HTTP) lengthened the engine's steps by
2-40% at one streaming client on a 2-core CPU (issue 7). vLLM V1 runs its EngineCore apart from the
API server for the same reason."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import torch

from adaptive import TreeChooser
from engine import Batch, Engine
from sequence import FAILED, Event, Request, Sequence
from serving import Served, load_served
from settings import Settings

log = logging.getLogger("medusa.engine")


# ---- messages: HTTP process -> engine process (a multiprocessing queue; None = stop) -------------


@dataclass(frozen=True)
class Submit:
    requests: list[Request]


@dataclass(frozen=True)
class Cancel:
    request_ids: list[str]


# ---- messages: engine process -> HTTP process (a pipe): ServedInfo or LoadFailed, then Reports -----


@dataclass(frozen=True)
class LoadFailed:
    message: str  # the traceback is in the engine process's log


@dataclass(frozen=True)
class Done:
    """A sequence's end, with its decode statistics."""

    finish_reason: str
    decode_steps: int
    decode_tokens: int
    engine_seconds: float  # from its admission to its end: the engine's own time for it

    @classmethod
    def of(cls, seq: Sequence, engine_seconds: float) -> Done:
        return cls(seq.finish_reason, seq.decode_steps, seq.decode_tokens, engine_seconds)


@dataclass
class Report:
    """One round of the loop."""

    events: list[Event] = field(default_factory=list)
    done: dict[str, Done] = field(default_factory=dict)  # finished this round (cancelled ones too)
    admitted: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # cancelled while waiting: never admitted
    failed: list[str] = field(default_factory=list)  # in a step that raised
    prompt_tokens: int = 0
    batch_size: int = 0  # sequences the round's decode step decoded (0: no step)
    tree: dict | None = None  # Tree.describe() of the step's tree for speculative sequences, if it had any
    seconds: float = 0.0


# ---- the engine process ----------------------------------------------------------------------------


def serve(loader: Callable[[Settings], Served], settings: Settings, inbox: multiprocessing.Queue,
          outbox: Connection) -> None:
    """The engine process's main (tensor-parallel rank 0 when there are several): load, say what was
    loaded (ServedInfo) or why not, then loop."""
    configure_logging(settings)
    os.setpgrp()  # out of the server's process group: Ctrl-C there lets the HTTP process drain, then stop this one
    threading.Thread(target=_exit_with_parent, name="parent-watch", daemon=True).start()
    try:
        served, lockstep = _load(loader, settings)
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


class Lockstep:
    """Tensor-parallel ranks run the same rounds: rank 0, fed by the HTTP process, sends each round's
    plan (its arrivals and cancels, or None to stop) to the others over a CPU (gloo) group, and every
    rank then runs that round, whose forwards all-reduce between them."""

    def __init__(self, settings: Settings):
        import deepspeed  # slow to import: only tensor-parallel ranks need it here

        backend = "nccl" if settings.resolved_device().startswith("cuda") else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, rank=settings.rank,
                                   world_size=settings.world_size)  # MASTER_ADDR and MASTER_PORT: the launcher's
        self.group = torch.distributed.new_group(backend="gloo")

    def share(self, plan):
        """Rank 0's `plan`, on every rank."""
        box = [plan]
        torch.distributed.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


def _load(loader: Callable[[Settings], Served], settings: Settings) -> tuple[Served, Lockstep | None]:
    lockstep = Lockstep(settings) if settings.world_size > 1 else None
    served = loader(settings)
    if lockstep is not None and served.engine.chooser is not None:  # each rank timed its own steps:
        costs = lockstep.share(served.engine.chooser.costs)  # all take rank 0's, so that all choose alike
        served.engine.chooser = TreeChooser(served.tree, costs)
    return served, lockstep


def configure_logging(settings: Settings) -> None:
    """The same log lines from every process of the service."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _exit_with_parent() -> None:
    """Whatever this process is doing (loading, stepping, waiting), it ends when the HTTP process does:
    an orphan would hold the model's memory (a GPU's) for nothing."""
    multiprocessing.connection.wait([multiprocessing.parent_process().sentinel])
    os._exit(1)


class EngineCore:
    """The loop. On rank 0 (or alone) the inbox and outbox connect it to the HTTP process; a follower
    rank has neither and runs the plans its lockstep receives."""

    def __init__(self, engine: Engine, max_wait_ms: float, inbox: multiprocessing.Queue | None,
                 outbox: Connection | None, lockstep: Lockstep | None = None):
        self.engine, self.max_wait, self.inbox, self.outbox = engine, max_wait_ms / 1000, inbox, outbox
        self.lockstep = lockstep
        engine.isolates_failures = lockstep is None
        self.waiting: deque[Request] = deque()
        self.cancels: set[str] = set()
        self.admitted_at: dict[str, float] = {}  # running request id -> time.perf_counter() at admission
        self.stopping = False

    def run(self) -> None:
        batch = self.engine.new_batch()
        while True:
            plan = self._plan(batch) if self.inbox is not None else None
            if self.lockstep is not None:
                plan = self.lockstep.share(plan)
            if plan is None:
                return
            arrivals, cancels = plan
            for request_id in cancels:
                batch.cancel(request_id)
            now = time.perf_counter()
            self.admitted_at.update((r.id, now) for r in arrivals)
            if not arrivals and not batch.seqs:  # only cancels of finished requests came
                continue
            report = Report()
            start = time.perf_counter()
            try:
                self._round(batch, arrivals, report)
            except Exception:  # the engine isolates a request that fails a step (only it fails); what fails
                # beyond that fails the round's requests, never the loop, except in lockstep:
                if self.lockstep is not None:  # another rank may have stepped fine, and its batch no longer
                    raise  # matches this one's; every rank stops (the launcher stops the rest)
                log.exception("engine step failed")
                report.failed = list(self.admitted_at)  # every admitted sequence not yet reported done
                self.admitted_at.clear()
                report.events, report.done = [], {}
                batch.seqs.clear()
                batch = None  # free the old cache before allocating the new one
                batch = self.engine.new_batch()
            report.seconds = time.perf_counter() - start
            if self.outbox is not None:
                self.outbox.send(report)

    def _plan(self, batch: Batch) -> tuple[list[Request], set[str]] | None:
        """The next round's arrivals and cancels, from the HTTP process's messages; None: stop."""
        self._receive(block=not self.waiting and not batch.seqs)
        if not self.stopping and not batch.seqs and self.max_wait > 0:
            self._gather()
        return None if self.stopping else self._admit(batch)

    def _receive(self, block: bool) -> None:
        """Take every message waiting; if `block`, first wait for one."""
        if block:
            self._take(self.inbox.get())
        while not self.stopping:
            try:
                self._take(self.inbox.get_nowait())
            except queue.Empty:
                return

    def _take(self, message: Submit | Cancel | None) -> None:
        if message is None:
            self.stopping = True
        elif isinstance(message, Submit):
            self.waiting.extend(message.requests)
        else:
            self.cancels.update(message.request_ids)

    def _gather(self) -> None:
        """The engine is idle: let arrivals gather for up to max_wait, or until a batch is full."""
        deadline = time.perf_counter() + self.max_wait
        while len(self.waiting) < self.engine.max_batch_size and not self.stopping:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            try:
                self._take(self.inbox.get(timeout=left))
            except queue.Empty:
                return

    def _admit(self, batch: Batch) -> tuple[list[Request], set[str]]:
        """Cancels first (waiting ones are dropped, running ones end at this round), then FIFO into the
        free slots. Said at once, before the round's forwards, so that the HTTP process counts them."""
        cancels, self.cancels = self.cancels, set()
        dropped = [r.id for r in self.waiting if r.id in cancels]
        if dropped:
            self.waiting = deque(r for r in self.waiting if r.id not in cancels)
        free = self.engine.free_slots(batch)
        arrivals = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
        if arrivals or dropped:
            self.outbox.send(Report(admitted=[r.id for r in arrivals], dropped=dropped))
        return arrivals, cancels

    def _round(self, batch: Batch, arrivals: list[Request], report: Report) -> None:
        report.events = self.engine.admit(batch, arrivals)
        report.prompt_tokens = sum(len(r.prompt_ids) for r in arrivals)
        finished = self.engine.filter(batch)
        if batch.seqs:
            report.batch_size = len(batch.seqs)
            report.events += self.engine.step(batch)
            report.tree = next((t.describe() for t, s in zip(batch.trees, batch.seqs) if s.request.speculative), None)
            finished += self.engine.filter(batch)
        now = time.perf_counter()
        report.done = {s.request.id: Done.of(s, now - self.admitted_at.pop(s.request.id)) for s in finished
                       if s.finish_reason != FAILED}
        report.failed = [s.request.id for s in finished if s.finish_reason == FAILED]
