"""The asyncio front of the engine: a bounded FIFO queue of requests and ONE thread that owns the
model and runs the engine loop (continuous batching: arrivals join the running batch at the next
step, finished sequences leave it). Each HTTP request gets a Ticket whose asyncio queue receives
its sequences' events."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import torch

from engine import Batch, Engine
from metrics import ServiceMetrics
from sequence import Event, Request, Sequence

log = logging.getLogger(__name__)


class QueueFull(Exception):
    def __init__(self, retry_after: float):
        super().__init__(f"the server is at capacity; retry in {retry_after:.0f} s")
        self.retry_after = retry_after


class EngineFailure(Exception):
    """The engine step this request was in failed; other steps are unaffected."""


class RequestTimeout(Exception):
    """The request's deadline passed before all its sequences finished."""


@dataclass(frozen=True)
class Update:
    index: int  # the choice this event belongs to
    event: Event
    sequence: Sequence | None  # set on the sequence's last event


@dataclass
class Ticket:
    """One HTTP request's sequences (its choices) and the updates the engine thread sends them."""

    requests: list[Request]
    arrival: float = field(default_factory=time.perf_counter)
    updates: asyncio.Queue = field(default_factory=asyncio.Queue)  # Update | EngineFailure
    cancelled: bool = False

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
            remaining -= item.sequence is not None
            yield item


class DynamicBatcher:
    def __init__(self, engine: Engine, max_wait_ms: float, queue_size: int, metrics: ServiceMetrics):
        self.engine = engine
        self.max_wait = max_wait_ms / 1000
        self.queue_size = queue_size
        self.metrics = metrics
        self.batch_sizes: Counter[int] = Counter()  # decode steps by running sequences
        self._waiting: deque[tuple[Ticket, int]] = deque()
        self._owner: dict[str, tuple[Ticket, int]] = {}  # request id -> (ticket, choice index), running
        self._cancel: set[str] = set()
        self._running = 0  # sequences in the running batch, as of the last round
        self.dead = False  # the engine loop has stopped for good
        self._cv = threading.Condition()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._step_seconds = 0.05  # running estimate, for Retry-After
        self.threads: int | None = None  # intra-op threads of the engine thread's CPU ops, once it runs

    # ---- asyncio side ----------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        with self._cv:
            owners = list(self._owner.values()) + list(self._waiting)
            self._waiting.clear()
        self._fail(owners)

    def submit(self, requests: list[Request]) -> Ticket:
        """Queue all of a request's sequences, or none (QueueFull)."""
        ticket = Ticket(requests)
        with self._cv:
            if self.dead:
                raise EngineFailure("the engine has stopped; see the server log")
            room = self.queue_size + self.engine.max_batch_size - self._running  # the queue + free slots
            if len(self._waiting) + len(requests) > room:
                raise QueueFull(self._retry_after())
            self._waiting.extend((ticket, i) for i in range(len(requests)))
            self.metrics.waiting.set(len(self._waiting))
            self._cv.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Drop the ticket's waiting sequences now and its running ones at the next step."""
        with self._cv:
            ticket.cancelled = True
            if any(t is ticket for t, _ in self._waiting):
                self._waiting = deque(entry for entry in self._waiting if entry[0] is not ticket)
                self.metrics.waiting.set(len(self._waiting))
            self._cancel.update(r.id for r in ticket.requests)
            self._cv.notify()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self._running

    def _retry_after(self) -> float:
        """Seconds until a slot is likely free: the queue ahead, drained a batch per few steps."""
        per_slot = self._step_seconds * 16 / self.engine.max_batch_size
        return max(1.0, round(per_slot * (len(self._waiting) + 1)))

    # ---- engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        self.threads = torch.get_num_threads()  # per thread: the event loop's own count may differ
        try:
            self._serve()
        except BaseException:  # the loop itself broke: answer everyone, refuse new work
            log.exception("the engine loop stopped")
            with self._cv:
                self.dead = True
                owners = list(self._owner.values()) + list(self._waiting)
                self._waiting.clear()
            self._fail(owners)

    def _serve(self) -> None:
        batch = self.engine.new_batch()
        while True:
            arrivals, cancels = self._next_arrivals(batch)
            if arrivals is None:
                return
            for request_id in cancels:
                batch.cancel(request_id)
            start = time.perf_counter()
            try:
                events, finished = self._round(batch, arrivals)
            except Exception:  # one failed step fails its requests, never the loop
                log.exception("engine step failed")
                owners = [self._owner[s.request.id] for s in batch.seqs]
                self._fail(owners + [self._owner[r.id] for r in arrivals if r.id in self._owner])
                events, finished = [], []
                batch.seqs.clear()
                batch = None  # free the old cache before allocating the new one
                batch = self.engine.new_batch()
            else:
                self._step_seconds = 0.9 * self._step_seconds + 0.1 * (time.perf_counter() - start)
                self._dispatch(events, finished)
            with self._cv:
                self._running = len(batch.seqs)
            self.metrics.running.set(len(batch.seqs))

    def _next_arrivals(self, batch: Batch) -> tuple[list[Request] | None, set[str]]:
        """Block while there is nothing to do; when the engine is idle, gather arrivals for up to
        max_wait; then pop FIFO into the free slots. (None, ...) when stopping."""
        with self._cv:
            while not self._waiting and not batch.seqs and not self._stopping:
                self._cv.wait()
            if self._stopping:
                return None, set()
            if not batch.seqs and self.max_wait > 0:
                deadline = time.perf_counter() + self.max_wait
                while len(self._waiting) < self.engine.max_batch_size and not self._stopping:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cv.wait(left)
            arrivals = []
            while self._waiting and len(arrivals) < self.engine.free_slots(batch):
                ticket, index = self._waiting.popleft()
                if not ticket.cancelled:
                    arrivals.append(ticket.requests[index])
                    self._owner[ticket.requests[index].id] = (ticket, index)
            cancels, self._cancel = self._cancel, set()
            self._running += len(arrivals)  # counted from now, so that submit() never overbooks
            self.metrics.waiting.set(len(self._waiting))
        return arrivals, cancels

    def _round(self, batch: Batch, arrivals: list[Request]) -> tuple[list[Event], list[Sequence]]:
        events = self.engine.admit(batch, arrivals)
        self.metrics.prompt_tokens.inc(sum(len(r.prompt_ids) for r in arrivals))
        finished = self.engine.filter(batch)
        if batch.seqs:
            self.batch_sizes[len(batch.seqs)] += 1
            self.metrics.batch_size.observe(len(batch.seqs))
            self.metrics.decode_steps.inc()
            events += self.engine.step(batch)
            finished += self.engine.filter(batch)
        self.metrics.generation_tokens.inc(sum(len(e.token_ids) for e in events))
        return events, finished

    def _dispatch(self, events: list[Event], finished: list[Sequence]) -> None:
        done = {s.request.id: s for s in finished}
        items = []
        for event in events:
            ticket, index = self._owner[event.request_id]
            seq = done.pop(event.request_id, None) if event.finish_reason else None
            items.append((ticket, Update(index, event, seq)))
        for seq in done.values():  # cancelled: no event of their own
            ticket, index = self._owner[seq.request.id]
            items.append((ticket, Update(index, Event(seq.request.id, [], "", seq.finish_reason), seq)))
        for request_id in [s.request.id for s in finished]:
            self._owner.pop(request_id, None)
        self._send(items)

    def _fail(self, owners: list[tuple[Ticket, int]]) -> None:
        """Fail these tickets (the details are in the log, not in the answer)."""
        tickets = list({id(t): t for t, _ in owners}.values())
        for ticket in tickets:
            ticket.cancelled = True  # its choices still waiting are never admitted
            for r in ticket.requests:
                self._owner.pop(r.id, None)
        self._send([(t, EngineFailure("the engine failed while decoding this request")) for t in tickets])

    def _send(self, items: list[tuple[Ticket, Update | EngineFailure]]) -> None:
        """One wake-up of the event loop per step, not one per sequence: each wake-up is a write to
        the loop's pipe, and the loop thread then takes the GIL from the engine thread."""
        if items:
            self._loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[Ticket, Update | EngineFailure]]) -> None:
    for ticket, item in items:
        ticket.updates.put_nowait(item)
