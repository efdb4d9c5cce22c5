"""The asyncio front of the engine: the HTTP process's side of the ONE engine process that owns the
model and runs the engine loop (engine/core.py; its batching policy is engine/scheduler.py: continuous
batching, arrivals join the running batch at the next round, finished sequences leave it). The front
admits requests into a bounded queue, sends them and their cancels to the engine process, and hands
each round's events to the HTTP requests' Tickets, whose asyncio queues their completions read."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from config.settings import Settings
from engine.messages import Cancel, Done, Event, LoadFailed, Report, Request, ServedInfo, Submit
from server.metrics import ServiceMetrics

Loader = Callable[[Settings], object]  # settings -> engine.serving.Served, called in the engine process

log = logging.getLogger(__name__)


class QueueFull(Exception):
    def __init__(self, retry_after: float):
        super().__init__(f"the server is at capacity; retry in {retry_after:.0f} s")
        self.retry_after = retry_after


class EngineFailure(Exception):
    """The engine step this request was in failed; other steps are unaffected."""


class RequestTimeout(Exception):
    """The request's deadline passed before all its sequences finished."""


class LoadError(Exception):
    """The engine process could not load the model (the reason is in the message and the log)."""


@dataclass(frozen=True)
class Update:
    index: int  # the choice this event belongs to
    event: Event
    done: Done | None  # set on the sequence's last event


@dataclass
class Ticket:
    """One HTTP request's sequences (its choices) and the updates the engine sends them."""

    requests: list[Request]
    arrival: float = field(default_factory=time.perf_counter)
    updates: asyncio.Queue = field(default_factory=asyncio.Queue)  # Update | EngineFailure

    async def stream(self, deadline: float | None = None):
        """Updates until every sequence has finished; raises EngineFailure if its step failed and
        RequestTimeout once time.perf_counter() passes `deadline`."""
        remaining = len(self.requests)
        while remaining:
            try:  # not asyncio.wait_for: on Python 3.11 it can swallow a cancel that lands as an update arrives
                async with asyncio.timeout(None if deadline is None else max(0.0, deadline - time.perf_counter())):
                    item = await self.updates.get()
            except TimeoutError:
                raise RequestTimeout from None
            if isinstance(item, EngineFailure):
                raise item
            remaining -= item.done is not None
            yield item


class DynamicBatcher:
    STOP_TIMEOUT_S = 30.0  # for the engine process to finish its round and exit

    def __init__(self, settings: Settings, loader: Loader | None, metrics: ServiceMetrics,
                 on_exit: Callable[[], None] | None = None):
        """`loader` builds what is served, in the engine process (None: engine.serving.load_served).
        `on_exit` is called if the engine process exits while serving (not when stop() ends it)."""
        self.settings, self.loader, self.metrics, self.on_exit = settings, loader, metrics, on_exit
        self.queue_size = settings.queue_size
        self.info: ServedInfo | None = None  # once loaded
        self.batch_sizes: Counter[int] = Counter()  # decode steps by running sequences
        self.tree_in_use: dict | None = None  # the last step's tree for speculative sequences
        self.dead = False  # the engine process has stopped for good
        self._owner: dict[str, tuple[Ticket, int]] = {}  # request id -> (ticket, choice), in the engine process
        self._waiting: set[str] = set()  # of those, not admitted yet
        self._cancelling: set[str] = set()  # of those, cancelled: their room is free for new requests
        self._step_seconds = 0.05  # running estimate, for Retry-After
        self._process: multiprocessing.Process | None = None
        self._stopping = False

    async def start(self) -> ServedInfo:
        """Start the engine process; return once it has loaded the model (LoadError if it could not)."""
        spawn = multiprocessing.get_context("spawn")  # fork is unsafe with CUDA and with threads running
        self._inbox = spawn.Queue()
        self._conn, sender = spawn.Pipe(duplex=False)
        process = spawn.Process(target=engine_main, args=(self.loader, self.settings, self._inbox, sender),
                                name="medusa-engine", daemon=True)
        try:
            process.start()  # pickles the loader: a lambda or a closure cannot go to another process
        except Exception as e:
            raise LoadError(f"the engine process could not start: {e}") from e
        finally:
            sender.close()  # the engine process holds its own end: the pipe reads EOF when it exits
        self._process = process
        self.metrics.watch_engine(process.pid)
        loop = asyncio.get_running_loop()
        self._loaded = loop.create_future()
        loop.add_reader(self._conn.fileno(), self._receive)
        os.set_blocking(self._conn.fileno(), True)  # uvloop's add_reader made it non-blocking; recv() reads
        # a whole message, which may still be arriving: a non-blocking read would fail half-way
        return await self._loaded

    async def stop(self) -> None:
        """Let the engine process finish its round and exit; fail whatever was still in it."""
        if self._process is None:
            return
        self._stopping = True
        if self._process.is_alive() and self._loaded.done() and not self.dead:  # not waited for: a model still loading
            self._inbox.put(None)
            await asyncio.to_thread(self._process.join, self.STOP_TIMEOUT_S)
        if self._process.is_alive():
            self._process.kill()
        self._gone()

    def submit(self, requests: list[Request]) -> Ticket:
        """Queue all of a request's sequences, or none (QueueFull)."""
        if self.dead:
            raise EngineFailure("the engine has stopped; see the server log")
        held = len(self._owner) - len(self._cancelling)
        if held + len(requests) > self.queue_size + self.info.max_batch_size:  # the queue + the batch
            raise QueueFull(self._retry_after())
        ticket = Ticket(requests)
        for i, r in enumerate(requests):
            self._owner[r.id] = (ticket, i)
            self._waiting.add(r.id)
        self._inbox.put(Submit(requests))
        self.metrics.waiting.set(len(self._waiting))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Drop the ticket's waiting sequences and end its running ones at the engine's next round; a
        no-op once they have all finished."""
        ids = [r.id for r in ticket.requests if r.id in self._owner and r.id not in self._cancelling]
        if ids and not self.dead:
            self._cancelling.update(ids)
            self._inbox.put(Cancel(ids))

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._owner) - len(self._waiting)

    def _retry_after(self) -> float:
        """Seconds until a slot is likely free: the queue ahead, drained a batch per few steps."""
        per_slot = self._step_seconds * 16 / self.info.max_batch_size
        return max(1.0, round(per_slot * (len(self._waiting) + 1)))

    # ---- what the engine process sends -----------------------------------------------------------

    def _receive(self) -> None:
        """The pipe is readable (the event loop calls this): take every message there."""
        try:
            while self._conn.poll():
                message = self._conn.recv()
                if isinstance(message, Report):
                    self._dispatch(message)
                elif self._loaded.done():  # start() was cancelled: the server is stopping
                    pass
                elif isinstance(message, LoadFailed):
                    self._loaded.set_exception(LoadError(message.message))
                else:
                    self.info = message
                    self._loaded.set_result(message)
        except (EOFError, OSError):  # the engine process exited
            self._gone()
        except Exception as e:  # a message that does not unpickle here: nothing more can be trusted
            log.exception("unreadable message from the engine process")
            if not self._loaded.done():
                self._loaded.set_exception(LoadError(f"the engine process sent what could not be read: {e}"))
            self._process.kill()
            self._gone()

    def _dispatch(self, report: Report) -> None:
        self._waiting.difference_update(report.admitted + report.dropped)
        done = dict(report.done)
        for event in report.events:
            if event.request_id in self._owner:  # else its ticket has failed
                ticket, index = self._owner[event.request_id]
                end = done.pop(event.request_id, None) if event.finish_reason else None  # on its last event
                ticket.updates.put_nowait(Update(index, event, end))
        for request_id, end in done.items():  # cancelled: no event of their own
            if request_id in self._owner:
                ticket, index = self._owner[request_id]
                ticket.updates.put_nowait(Update(index, Event(request_id, [], "", end.finish_reason), end))
        for request_id in [*report.done, *report.dropped]:
            self._owner.pop(request_id, None)
            self._cancelling.discard(request_id)
        if report.failed:
            self._fail(report.failed)
        self._count(report)

    def _count(self, report: Report) -> None:
        m = self.metrics
        m.prompt_tokens.inc(report.prompt_tokens)
        m.generation_tokens.inc(sum(len(e.token_ids) for e in report.events))
        if report.batch_size:
            self.batch_sizes[report.batch_size] += 1
            m.batch_size.observe(report.batch_size)
            m.decode_steps.inc()
            self._step_seconds = 0.9 * self._step_seconds + 0.1 * report.seconds
        if report.tree is not None:
            self.tree_in_use = report.tree
            m.tree_nodes.set(report.tree["nodes"])
            m.speculative_steps.labels(str(report.tree["nodes"])).inc()
        m.running.set(self.running)
        m.waiting.set(len(self._waiting))

    def _fail(self, request_ids: list[str]) -> None:
        """Fail the tickets of these requests (the details are in the log, not in the answer), and
        cancel their other choices."""
        tickets = list({id(t): t for t, _ in (self._owner[r] for r in request_ids if r in self._owner)}.values())
        for ticket in tickets:
            self.cancel(ticket)
            for r in ticket.requests:
                self._owner.pop(r.id, None)
                self._waiting.discard(r.id)
                self._cancelling.discard(r.id)
            ticket.updates.put_nowait(EngineFailure("the engine failed while decoding this request"))
        self.metrics.running.set(self.running)
        self.metrics.waiting.set(len(self._waiting))

    def _gone(self) -> None:
        """The engine process has exited: refuse new work and fail all work in flight."""
        if self.dead:
            return
        self.dead = True
        asyncio.get_running_loop().remove_reader(self._conn.fileno())
        self._conn.close()
        if not self._loaded.done():
            self._loaded.set_exception(LoadError("the engine process exited while loading; see the log"))
        elif not self._stopping:
            log.error("the engine process (pid %s) exited; failing the requests in flight", self._process.pid)
            if self.on_exit is not None:
                self.on_exit()
        self._fail(list(self._owner))
        self._inbox.cancel_join_thread()  # nothing reads it any more: exiting must not wait on it
        self._inbox.close()


def engine_main(loader: Loader | None, settings: Settings, inbox: multiprocessing.Queue, outbox) -> None:
    """The engine process's target. The engine (and torch) is imported there, never in this process."""
    from engine.process import serve

    serve(loader, settings, inbox, outbox)
