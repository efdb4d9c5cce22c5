"""The engine loop, in the engine process: take the HTTP process's requests and cancels into the
scheduler, run one round (admit the scheduled arrivals into free batch slots, step the batch), and
send the round's events back as one Report."""

from __future__ import annotations

import logging
import multiprocessing
import queue
import time
from multiprocessing.connection import Connection

from engine.batch import Batch, Round
from engine.decode import Engine
from engine.lockstep import Lockstep
from engine.messages import FAILED, Cancel, Done, Report, Request, Submit
from engine.scheduler import Scheduler

log = logging.getLogger("medusa.engine")


class EngineCore:
    """On rank 0 (or alone) the inbox and outbox connect it to the HTTP process; a follower rank has
    neither and runs the plans its lockstep receives."""

    def __init__(self, engine: Engine, max_wait_ms: float, inbox: multiprocessing.Queue | None,
                 outbox: Connection | None, lockstep: Lockstep | None = None):
        self.engine, self.inbox, self.outbox, self.lockstep = engine, inbox, outbox, lockstep
        engine.isolates_failures = lockstep is None
        self.scheduler = Scheduler(engine.max_batch_size, max_wait_ms / 1000)
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
            start = time.perf_counter()
            try:
                report = self._report(self.engine.round(batch, arrivals), arrivals)
            except Exception:  # the engine isolates a request that fails a step (only it fails); what fails
                # beyond that fails the round's requests, never the loop, except in lockstep:
                if self.lockstep is not None:  # another rank may have stepped fine, and its batch no longer
                    raise  # matches this one's; every rank stops (the launcher stops the rest)
                log.exception("engine step failed")
                report = Report(failed=list(self.admitted_at))  # every admitted sequence not yet reported done
                self.admitted_at.clear()
                batch.seqs.clear()
                batch = None  # free the old cache before allocating the new one
                batch = self.engine.new_batch()
            report.seconds = time.perf_counter() - start
            if self.outbox is not None:
                self.outbox.send(report)

    def _report(self, done: Round, arrivals: list[Request]) -> Report:
        now = time.perf_counter()
        ended = {s.request.id: Done(s.finish_reason, s.decode_steps, s.decode_tokens,
                                    now - self.admitted_at.pop(s.request.id)) for s in done.finished}
        return Report(events=done.events, done={i: d for i, d in ended.items() if d.finish_reason != FAILED},
                      failed=[i for i, d in ended.items() if d.finish_reason == FAILED],
                      prompt_tokens=sum(len(r.prompt_ids) for r in arrivals), batch_size=done.batch_size,
                      tree=done.tree)

    def _plan(self, batch: Batch) -> tuple[list[Request], set[str]] | None:
        """The next round's arrivals and cancels, from the HTTP process's messages; None: stop. Who was
        admitted or dropped is said at once, before the round's forwards, so that the HTTP process
        counts them."""
        self._receive(block=not self.scheduler.waiting and not batch.seqs)
        if not self.stopping and not batch.seqs:
            self.scheduler.gather(self._receive_one)
        if self.stopping:
            return None
        plan = self.scheduler.next_round(self.engine.free_slots(batch))
        if plan.arrivals or plan.dropped:
            self.outbox.send(Report(admitted=[r.id for r in plan.arrivals], dropped=plan.dropped))
        return plan.arrivals, plan.cancels

    def _receive(self, block: bool) -> None:
        """Take every message waiting; if `block`, first wait for one."""
        if block:
            self._take(self.inbox.get())
        while not self.stopping:
            try:
                self._take(self.inbox.get_nowait())
            except queue.Empty:
                return

    def _receive_one(self, timeout: float) -> bool:
        try:
            self._take(self.inbox.get(timeout=timeout))
        except queue.Empty:
            return False
        return not self.stopping

    def _take(self, message: Submit | Cancel | None) -> None:
        if message is None:
            self.stopping = True
        elif isinstance(message, Submit):
            self.scheduler.add(message.requests)
        else:
            self.scheduler.cancel(message.request_ids)
