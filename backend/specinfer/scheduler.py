"""Iteration-level scheduling: a waiting queue and a fixed set of cache rows.

Requests join when a row is free and leave as soon as they finish, between iterations. A prompt is
prefilled in a forward of its own, one per step that admits requests, and that forward stalls every
running request; so while a large batch runs, a newcomer may wait a few steps (``hold_steps``) for
others to share its prompt forward, as vLLM's ``scheduler_delay_factor`` does by time.
"""
from __future__ import annotations

from collections import deque

from .sequence import Sequence

HOLD_RUNNING = 8  # running requests from which a newcomer may be held: an idle row then costs an eighth of a step or
# less, a prompt forward of its own about a whole step (2-core CPU, demo LLM: ~45 ms of fixed cost at any batch)
HOLD_GROUP = 4  # newcomers that fill this many rows are admitted at once


class Scheduler:
    def __init__(self, max_batch_size: int, hold_steps: int = 0) -> None:
        """``hold_steps``: the most steps newcomers wait for others while ``HOLD_RUNNING`` requests or
        more run, unless they fill ``HOLD_GROUP`` rows (0: admitted at once)."""
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_rows = list(range(max_batch_size - 1, -1, -1))
        self.hold_steps, self.held = hold_steps, 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting requests onto free rows; returns the newly admitted ones."""
        if (self.waiting and self.free_rows and len(self.running) >= HOLD_RUNNING and self.held < self.hold_steps
                and min(len(self.waiting), len(self.free_rows)) < HOLD_GROUP):
            self.held += 1
            return []
        self.held = 0
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
