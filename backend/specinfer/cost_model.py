"""What a model's forward costs on this machine, measured: seconds by the rows it feeds and the tokens.

A forward of ``rows`` requests feeds each its root (plain decoding: ``tokens == rows``) and some
of them more nodes (verification, catch-up): ``tokens - rows`` extra ones. What the extra tokens
cost depends on the rows beside them, not only on how many there are: on the 2-core CPU one chain
of 8 beside no other request costs 1.02x a lone root, 7 extra tokens beside 15 lone roots cost
1.25-1.5x the roots alone (the attention splits the batch, ``batch_invariance.SplitKeys``). So the
costs are one curve of plain decoding by rows, and, per rows bucket (powers of two), curves of
what the extra tokens add: chains (keys in slot order) and branching trees (the attention's tree
path). Each is an exponential moving average per count (the curve's shape, at the prefix lengths
the engine serves) times one speed shared by all (the machine's load). Counts never seen are
interpolated between measured neighbours (extrapolated proportionally past the largest); a rows
bucket never measured borrows the nearest measured one's. Adaptive trees calibrate at start-up
(``AdaptivePolicy.calibrate``) and keep learning from real steps.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Callable

DECAY = 0.25  # weight of the newest measurement
SHAPE_DECAY = 0.1  # the same for the curve's shape, slower: the speed follows the load, the shape the prefixes


def moving_average(old: float | None, new: float, decay: float = DECAY) -> float:
    """``new`` weighted by ``decay`` against the average so far (``new`` itself when there is none)."""
    return new if old is None else old + decay * (new - old)


def bucket(rows: int) -> int:
    """The power of two at or above ``rows``: forwards of similar batch sizes share extra-token curves."""
    return 1 << (max(rows, 1) - 1).bit_length()


class Curve:
    """Values by count, non-decreasing (a forward over more tokens never costs less; single timings
    on a loaded machine often say otherwise, so the measured values are fitted by isotonic
    regression), interpolated linearly between measured counts and proportionally past the
    largest; below the smallest, flat (``origin`` false) or proportional from zero (``origin``)."""

    def __init__(self, origin: bool = False) -> None:
        self.values: dict[int, float] = {}  # as measured (moving averages)
        self.counts: list[int] = []
        self.origin = origin
        self.fitted: dict[int, float] | None = None

    def __bool__(self) -> bool:
        return bool(self.counts)

    def get(self, n: int) -> float | None:
        return self.values.get(n)

    def set(self, n: int, value: float) -> None:
        if n not in self.values:
            bisect.insort(self.counts, n)
        self.values[n] = value
        self.fitted = None

    def fit(self) -> dict[int, float]:
        """The non-decreasing values nearest the measured ones (pool adjacent violators)."""
        if self.fitted is None:
            blocks: list[list[float]] = []  # [mean, points]
            for n in self.counts:
                blocks.append([self.values[n], 1.0])
                while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
                    (m2, w2), (m1, w1) = blocks.pop(), blocks.pop()
                    blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
            flat = [m for m, w in blocks for _ in range(int(w))]
            self.fitted = dict(zip(self.counts, flat))
        return self.fitted

    def at(self, n: int) -> float:
        counts = self.counts
        if not counts:
            return 0.0
        values = self.fit()
        i = bisect.bisect_left(counts, n)
        if i < len(counts) and counts[i] == n:
            return values[n]
        if i == 0:
            return values[counts[0]] * (n / counts[0] if self.origin else 1.0)
        if i == len(counts):
            return values[counts[-1]] * n / counts[-1]
        lo, hi = counts[i - 1], counts[i]
        w = (n - lo) / (hi - lo)
        return (1 - w) * values[lo] + w * values[hi]


class ForwardCosts:
    """Plain decoding's seconds by rows, and per rows bucket what extra tokens add, as chains or as
    branching trees; all at speed one, times the machine's current speed. A forward at one count
    moves the speed for all, so a count not fed for a while (plain decoding's, while the engine
    speculates) is priced at the machine's current speed, not at the moment it was last seen."""

    def __init__(self) -> None:
        self.plain = Curve()  # seconds by rows (one token each)
        self.extra: dict[tuple[int, bool], Curve] = {}  # (rows bucket, branching): seconds added by extra tokens
        self.speed = 1.0

    def observe(self, tokens: int, seconds: float, tree: bool = False, rows: int | None = None) -> None:
        """A forward of ``tokens`` over ``rows`` requests (``None``: one token each) took ``seconds``;
        ``tree``: some request's nodes branch."""
        rows = tokens if rows is None else rows
        if tokens <= rows:
            curve, n, base = self.plain, tokens, 0.0
        else:
            curve, n, base = self.extra.setdefault((bucket(rows), tree), Curve(origin=True)), tokens - rows, self.plain.at(rows)
        known = curve.get(n)
        priced = base + max(curve.at(n), 0.0)  # as predict prices it
        if known is not None and priced > 0:
            self.speed = moving_average(self.speed, seconds / priced)
        curve.set(n, moving_average(known, seconds / self.speed - base, SHAPE_DECAY))

    def predict(self, tokens: int, tree: bool = False, rows: int | None = None) -> float:
        """Seconds for a forward over ``tokens`` for ``rows`` requests (``None``: one token each);
        0 before anything was measured. Extra tokens never measured at any batch size cost what
        plain decoding's tokens do."""
        rows = tokens if rows is None else rows
        base = self.plain.at(rows)
        if tokens <= rows:
            return self.speed * base
        curve = self.nearest(rows, tree)
        added = curve.at(tokens - rows) if curve is not None else base * (tokens - rows) / max(rows, 1)
        return self.speed * (base + max(added, 0.0))

    def nearest(self, rows: int, tree: bool) -> Curve | None:
        """The extra-token curve of ``rows``' bucket, else of the nearest measured bucket (ties: the
        larger); of the other kind where this kind was never measured."""
        for kind in (tree, not tree):
            have = [b for (b, t), c in self.extra.items() if t == kind and c]
            if have:
                want = math.log2(bucket(rows))
                return self.extra[min(have, key=lambda b: (abs(math.log2(b) - want), -b)), kind]
        return None


class FixedCosts:
    """Costs given as a function of tokens (tests inject the costs they want the engine to see)."""

    def __init__(self, seconds_per_forward: Callable[[int], float]) -> None:
        self.fn = seconds_per_forward

    def observe(self, tokens: int, seconds: float, tree: bool = False, rows: int | None = None) -> None:
        del tokens, seconds, tree, rows

    def predict(self, tokens: int, tree: bool = False, rows: int | None = None) -> float:
        del tree, rows
        return float(self.fn(tokens))


def calibration_sizes(largest: int) -> list[int]:
    """Counts (rows of plain decoding) to measure at start-up: every count to 4, then steps of about 1.5x."""
    sizes, n = [], 1
    while n < largest:
        sizes.append(n)
        n = n + 1 if n < 4 else int(n * 1.5)
    return sizes + [largest]


def powers(largest: int, factor: int) -> list[int]:
    """1, ``factor``, ``factor ** 2``, ... below ``largest``, and ``largest``."""
    sizes, n = [], 1
    while n < largest:
        sizes.append(n)
        n *= factor
    return sizes + [largest]


def calibration_rows(rows: int) -> list[int]:
    """Batch sizes whose extra tokens are measured at start-up: 1, 4, 16, ... below ``rows``, and
    ``rows`` (the buckets between borrow the nearest measured one's)."""
    return powers(rows, 4)
