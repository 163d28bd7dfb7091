"""What a model's forward costs on this machine, measured: seconds as a function of tokens fed.

Every forward a ``ModelRunner`` runs is recorded against the number of token slots it fed (batch x
padded tokens per request): an exponential moving average per count, so the figures follow the
machine's load and the prefix lengths the engine currently serves. Counts never seen are
interpolated between measured neighbours (extrapolated proportionally beyond the largest).
Adaptive trees calibrate once at start-up (``calibrate``) and keep learning from real steps.
"""
from __future__ import annotations

import bisect
from collections.abc import Callable

DECAY = 0.25  # weight of the newest measurement


def moving_average(old: float | None, new: float) -> float:
    """``new`` weighted by ``DECAY`` against the average so far (``new`` itself when there is none)."""
    return new if old is None else old + DECAY * (new - old)


class ForwardCosts:
    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}
        self.counts: list[int] = []  # sorted keys of ``seconds``

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens not in self.seconds:
            bisect.insort(self.counts, tokens)
        self.seconds[tokens] = moving_average(self.seconds.get(tokens), seconds)

    def predict(self, tokens: int) -> float:
        """Seconds for a forward over ``tokens`` slots; 0 before anything was measured."""
        counts = self.counts
        if not counts:
            return 0.0
        i = bisect.bisect_left(counts, tokens)
        if i < len(counts) and counts[i] == tokens:
            return self.seconds[tokens]
        if i == 0:
            return self.seconds[counts[0]]
        if i == len(counts):
            top = counts[-1]
            return self.seconds[top] * tokens / top
        lo, hi = counts[i - 1], counts[i]
        w = (tokens - lo) / (hi - lo)
        return (1 - w) * self.seconds[lo] + w * self.seconds[hi]


class FixedCosts:
    """Costs given as a function (tests inject the costs they want the engine to see)."""

    def __init__(self, seconds_per_forward: Callable[[int], float]) -> None:
        self.fn = seconds_per_forward

    def observe(self, tokens: int, seconds: float) -> None:
        del tokens, seconds

    def predict(self, tokens: int) -> float:
        return float(self.fn(tokens))


def calibration_sizes(largest: int) -> list[int]:
    """Token counts to measure at start-up: every count to 4, then steps of about 1.5x."""
    sizes, n = [], 1
    while n < largest:
        sizes.append(n)
        n = n + 1 if n < 4 else int(n * 1.5)
    return sizes + [largest]
