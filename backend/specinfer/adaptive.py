"""Adaptive trees: how deep to draft and which nodes to verify, so accepted tokens per second is highest.

Two decisions per step, both maximising (tokens emitted) / (seconds spent) over the batch:
- before drafting, the depth ``d`` the SSMs draft to (0: no SSM forward at all, plain decoding),
  from each request's recent gains per depth and the measured costs of the SSM and LLM forwards;
- after drafting, the number ``T`` of tree tokens the LLM verifies per request: every request keeps
  its ``T - 1`` nodes most likely to be accepted (the root always), the same ``T`` for all because
  the batch is padded to its largest tree anyway.

A node is accepted iff every node on its path is, so with ``r(node)`` the probability that a node
is accepted given its parent was (``AcceptanceModel``: the draft confidence, calibrated by what
verification accepted so far) the expected number of accepted draft tokens is the sum over the
verified nodes of the product of ``r`` along their paths (at most one node per depth is accepted,
so these events add up). These are pure functions of tensors plus one small learned table.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .cost_model import moving_average
from .tree import Tree

BINS = 20
PRIOR_WEIGHT = 4.0  # pseudo-observations per bin: until measured, a confidence is taken at its word


class AcceptanceModel:
    """P(node accepted | parent accepted) by draft-confidence bin, learned from verifications."""

    def __init__(self) -> None:
        centres = (torch.arange(BINS, dtype=torch.float64) + 0.5) / BINS
        self.tested = torch.full((BINS,), PRIOR_WEIGHT, dtype=torch.float64)
        self.accepted = centres * PRIOR_WEIGHT

    @staticmethod
    def bins(confidence: torch.Tensor) -> torch.Tensor:
        return (confidence.double() * BINS).long().clamp(0, BINS - 1)

    def rate(self, confidence: torch.Tensor) -> torch.Tensor:
        b = self.bins(confidence)
        return (self.accepted[b] / self.tested[b]).float()

    def observe(self, tree: Tree, path: list[int], mine: torch.Tensor | None = None) -> None:
        """Every node whose parent was accepted was tested; those on ``path`` passed. ``mine``
        ``[N]`` bool: only these nodes count (the ones this model's proposer drafted)."""
        if tree.size == 1:
            return
        on_path = torch.zeros(tree.size, dtype=torch.bool)
        on_path[[0] + path] = True
        parents = tree.parents[1:]
        tested = on_path[parents] if mine is None else on_path[parents] & mine[1:]
        b = self.bins(tree.confidence[1:][tested])
        self.tested.index_add_(0, b, torch.ones(len(b), dtype=torch.float64))
        self.accepted.index_add_(0, b, on_path[1:][tested].double())


def path_probability(tree: Tree, rate: torch.Tensor) -> torch.Tensor:
    """``[N]`` probability that each node is accepted: ``rate`` multiplied along its path (root 1)."""
    prob = rate.clone()
    prob[0] = 1.0
    for d in range(1, int(tree.depths.max()) + 1):
        level = tree.depths == d
        prob[level] = prob[tree.parents[level]] * rate[level]
    return prob


def best_nodes(tree: Tree, prob: torch.Tensor, count: int) -> list[int]:
    """The root and the ``count`` nodes most likely accepted, ascending (so parents come first: a
    child is never likelier than its parent, and ties go to the lower index)."""
    order = sorted(range(1, tree.size), key=lambda i: (-float(prob[i]), i))[:count]
    return [0] + sorted(order)


def choose_verify_size(gains: Sequence[torch.Tensor], llm_cost: Callable[[int], float], spent: float,
                       factor: float = 1.0) -> tuple[int, float]:
    """Tree tokens ``T`` (root included) each request verifies, and the predicted tokens per second.

    ``gains[b]`` are request ``b``'s path probabilities sorted descending (root excluded);
    ``llm_cost(tokens)`` the seconds of a verification forward over ``tokens`` slots; ``spent`` the
    seconds this step already took; ``factor`` corrects the predicted rate of verifying drafts
    (``RateCorrection``)."""
    b = len(gains)
    largest = max(len(g) for g in gains) + 1
    cum = torch.zeros(largest)
    for g in gains:
        cum[1: len(g) + 1] += torch.cumsum(g, 0)
        cum[len(g) + 1:] += g.sum()
    best, best_rate = 1, -1.0
    for t in range(1, largest + 1):
        seconds = spent + llm_cost(b * t)
        rate = (b + float(cum[t - 1])) / seconds if seconds > 0 else float("inf")
        rate *= factor if t > 1 else 1.0
        if rate > best_rate:
            best, best_rate = t, rate
    return best, best_rate


def choose_depth(depth_gains: Sequence[Sequence[float]], llm_cost: Callable[[int], float],
                 ssm_cost: Callable[[int], float], catch_up: int, level_widths: Sequence[int],
                 factor: float = 1.0) -> int:
    """How deep the SSMs draft this step (0: not at all).

    ``depth_gains[b][j]``: request ``b``'s expected accepted tokens from depth ``j + 1`` (its best
    node there, recently); ``ssm_cost(tokens)`` the seconds of one forward of all the SSMs;
    ``catch_up`` the padded catch-up tokens per request; ``level_widths[j]`` the nodes per request
    fed at level ``j + 1``; ``factor`` corrects the predicted rate of speculating. Depth ``d`` is
    costed as drafting ``d`` levels and verifying a chain of ``d`` nodes (the verification size is
    decided again once the tree is known).
    """
    b = len(depth_gains)
    best, best_rate = 0, b / llm_cost(b) if llm_cost(b) > 0 else float("inf")
    tokens, seconds = float(b), ssm_cost(b * catch_up)
    for d in range(1, len(level_widths) + 1):
        tokens += sum(g[d - 1] for g in depth_gains)
        if d > 1:
            seconds += ssm_cost(b * level_widths[d - 2])
        total = seconds + llm_cost(b * (d + 1))
        rate = factor * tokens / total if total > 0 else float("inf")
        if rate > best_rate:
            best, best_rate = d, rate
    return best


class RateCorrection:
    """How far realised tokens per second fall from predicted ones, for speculating steps against
    plain ones, by batch size (powers of two).

    The cost model prices forwards alone, measured at whatever prefix lengths it saw; a step also
    pays host work, catch-up and acceptance that differs from its calibration. The ratio of the two
    kinds' realised-to-predicted rates (a moving average) scales every speculating option's
    predicted rate, so a machine where speculation disappoints stops choosing it. Only speculating
    steps update their side of the ratio, so a bad spell would otherwise stick for good: after
    ``wait`` plain steps in a row the factor is 1 for a step (speculation is judged afresh), and
    ``wait`` doubles (up to ``MAX_WAIT``) each time that probe is taken, back to 2 once speculation
    is chosen on its merits.
    """

    MAX_WAIT = 64

    def __init__(self) -> None:
        self.error: dict[tuple[int, bool], float] = {}
        self.plain_run: dict[int, int] = {}  # plain steps in a row, by bucket
        self.wait: dict[int, int] = {}

    @staticmethod
    def bucket(batch: int) -> int:
        return 1 << (batch - 1).bit_length()

    def probing(self, b: int) -> bool:
        return self.plain_run.get(b, 0) >= self.wait.get(b, 2)

    def observe(self, batch: int, speculated: bool, predicted: float, realised: float) -> None:
        b = self.bucket(batch)
        if speculated:
            self.wait[b] = min(2 * self.wait.get(b, 2), self.MAX_WAIT) if self.probing(b) else 2
            self.plain_run[b] = 0
        else:
            self.plain_run[b] = self.plain_run.get(b, 0) + 1
        if predicted <= 0 or realised <= 0:
            return
        key = (b, speculated)
        self.error[key] = moving_average(self.error.get(key), realised / predicted)

    def factor(self, batch: int) -> float:
        """Speculating's error over plain decoding's (1 until both were seen at this batch size, and
        on probing steps)."""
        b = self.bucket(batch)
        spec, plain = self.error.get((b, True)), self.error.get((b, False))
        if spec is None or plain is None or self.probing(b):
            return 1.0
        return spec / plain
