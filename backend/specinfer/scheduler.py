"""Iteration-level scheduling: a waiting queue and a fixed set of cache rows.

Requests join when a row is free and leave as soon as they finish, between iterations.
"""
from __future__ import annotations

from collections import deque

from .sequence import Sequence


class Scheduler:
    def __init__(self, max_batch_size: int) -> None:
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_rows = list(range(max_batch_size - 1, -1, -1))

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting requests onto free rows; returns the newly admitted ones."""
        admitted = []
        while self.waiting and self.free_rows:
            seq = self.waiting.popleft()
            seq.row = self.free_rows.pop()
            admitted.append(seq)
        self.running.extend(admitted)
        self.running.sort(key=lambda s: s.row)  # consecutive rows let the cache be read without copies
        return admitted

    def abort(self, seq: Sequence) -> None:
        """Finish ``seq`` now: a waiting request leaves the queue, a running one its row at ``retire``."""
        seq.finish_reason = "cancelled"
        if seq in self.waiting:
            self.waiting.remove(seq)

    def retire(self) -> list[Sequence]:
        """Remove finished requests and free their rows; returns them."""
        done = [s for s in self.running if s.finished]
        for seq in done:
            self.free_rows.append(seq.row)
        self.running = [s for s in self.running if not s.finished]
        return done

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
