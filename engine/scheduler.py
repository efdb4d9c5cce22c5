"""The batching policy: who decodes next. Requests wait FIFO for a free batch slot (continuous
batching: they join the running batch at the next round); an idle engine lets arrivals gather for up
to `max_wait_s` first; a cancel drops a waiting request and ends a running one at the next round.
The engine process's loop (core.py) and the in-process `Engine.run` both schedule through it."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from engine.messages import Request


@dataclass(frozen=True)
class Plan:
    """One round's schedule."""

    arrivals: list[Request]  # to admit into free slots this round, in arrival order
    cancels: set[str]  # request ids to end at this round (running ones; waiting ones are in dropped)
    dropped: list[str]  # cancelled while waiting: never admitted


class Scheduler:
    def __init__(self, max_batch_size: int, max_wait_s: float = 0.0, requests: Iterable[Request] = ()):
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_s
        self.waiting: deque[Request] = deque(requests)
        self.cancels: set[str] = set()

    def add(self, requests: Iterable[Request]) -> None:
        self.waiting.extend(requests)

    def cancel(self, request_ids: Iterable[str]) -> None:
        self.cancels.update(request_ids)

    def gather(self, receive: Callable[[float], bool]) -> None:
        """The engine is idle: take arrivals for up to max_wait_s, or until a batch is full.
        `receive(timeout)` takes one message (add or cancel), False when none came in time (or stop)."""
        deadline = time.perf_counter() + self.max_wait_s
        while len(self.waiting) < self.max_batch_size:
            left = deadline - time.perf_counter()
            if left <= 0 or not receive(left):
                return

    def next_round(self, free_slots: int) -> Plan:
        """Cancels first, then the longest-waiting requests into the free slots."""
        cancels, self.cancels = self.cancels, set()
        dropped = [r.id for r in self.waiting if r.id in cancels]
        if dropped:
            self.waiting = deque(r for r in self.waiting if r.id not in cancels)
        arrivals = [self.waiting.popleft() for _ in range(min(free_slots, len(self.waiting)))]
        return Plan(arrivals, cancels, dropped)
