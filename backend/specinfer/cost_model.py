"""What a model's forward costs on this machine, measured: seconds as a function of tokens fed.

Every forward a ``ModelRunner`` runs is recorded against the number of token slots it fed (batch x
padded tokens per request): an exponential moving average per count (the curve's shape, the prefix
lengths the engine currently serves) and one of the machine's speed shared by all counts (its load). Counts never seen are
interpolated between measured neighbours (extrapolated proportionally beyond the largest).
Adaptive trees calibrate once at start-up (``calibrate``) and keep learning from real steps.
"""
from __future__ import annotations

import bisect
from collections.abc import Callable

DECAY = 0.25  # weight of the newest measurement
SHAPE_DECAY = 0.1  # the same for the curve's shape, slower: the speed follows the load, the shape the prefixes


def moving_average(old: float | None, new: float, decay: float = DECAY) -> float:
    """``new`` weighted by ``decay`` against the average so far (``new`` itself when there is none)."""
    return new if old is None else old + decay * (new - old)


class ForwardCosts:
    """Cost curves by token count times one speed shared by every count: a forward at one count
    moves the machine's speed for all, so a count not fed for a while (plain decoding's, while the
    engine speculates) is priced at the machine's current speed, not at the moment it was last seen.

    Two curves: forwards of chains (``tree=False``: lone roots, chunks, chains of drafts; every
    token's keys in slot order) and forwards with at least one branching tree, whose attention
    takes the tree path (``batch_invariance.VirtualKeys``) and costs more per step than its tokens
    alone say. A curve not measured yet is priced by the other."""

    def __init__(self) -> None:
        self.curves: dict[bool, dict[int, float]] = {False: {}, True: {}}  # seconds per count at speed 1
        self.counts: dict[bool, list[int]] = {False: [], True: []}  # sorted keys of each curve
        self.speed = 1.0

    def observe(self, tokens: int, seconds: float, tree: bool = False) -> None:
        curve = self.curves[tree]
        if tokens in curve:
            self.speed = moving_average(self.speed, seconds / curve[tokens])
        else:
            bisect.insort(self.counts[tree], tokens)
        curve[tokens] = moving_average(curve.get(tokens), seconds / self.speed, SHAPE_DECAY)

    def predict(self, tokens: int, tree: bool = False) -> float:
        """Seconds for a forward over ``tokens`` slots; 0 before anything was measured."""
        return self.speed * self.at_speed_one(tokens, tree if self.counts[tree] else not tree)

    def at_speed_one(self, tokens: int, tree: bool = False) -> float:
        counts, curve = self.counts[tree], self.curves[tree]
        if not counts:
            return 0.0
        i = bisect.bisect_left(counts, tokens)
        if i < len(counts) and counts[i] == tokens:
            return curve[tokens]
        if i == 0:
            return curve[counts[0]]
        if i == len(counts):
            top = counts[-1]
            return curve[top] * tokens / top
        lo, hi = counts[i - 1], counts[i]
        w = (tokens - lo) / (hi - lo)
        return (1 - w) * curve[lo] + w * curve[hi]


class FixedCosts:
    """Costs given as a function (tests inject the costs they want the engine to see)."""

    def __init__(self, seconds_per_forward: Callable[[int], float]) -> None:
        self.fn = seconds_per_forward

    def observe(self, tokens: int, seconds: float, tree: bool = False) -> None:
        del tokens, seconds, tree

    def predict(self, tokens: int, tree: bool = False) -> float:
        del tree
        return float(self.fn(tokens))


def calibration_sizes(largest: int) -> list[int]:
    """Token counts to measure at start-up: every count to 4, then steps of about 1.5x."""
    sizes, n = [], 1
    while n < largest:
        sizes.append(n)
        n = n + 1 if n < 4 else int(n * 1.5)
    return sizes + [largest]
