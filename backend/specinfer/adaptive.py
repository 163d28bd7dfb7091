"""Adaptive trees: how deep to draft and which nodes to verify, so accepted tokens per second is highest.

Two decisions per step, both maximising (tokens emitted) / (seconds spent) over the batch:
- before drafting, the depth ``d`` the SSMs draft to (0: no SSM forward at all, plain decoding),
  from each request's recent gains per depth and the measured costs of the SSM and LLM forwards;
- after drafting, how many nodes the LLM verifies for each request: the nodes most likely to be
  accepted are taken best first across the whole batch (roots always), priced by what the forward
  then costs (the model skips padding), so requests verify trees of different sizes.

A node is accepted iff every node on its path is, so with ``r(node)`` the probability that a node
is accepted given its parent was (``AcceptanceModel``: the draft confidence, calibrated by what
verification accepted so far) the expected number of accepted draft tokens is the sum over the
verified nodes of the product of ``r`` along their paths (at most one node per depth is accepted,
so these events add up). These are pure functions of tensors over the whole batch; ``AdaptivePolicy``
owns what they learn.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq

import torch

from .config import TreeConfig
from .cost_model import ForwardCosts, bucket, calibration_rows, calibration_sizes, moving_average, powers
from .proposers.base import Plan
from .model.batch_invariance import KEY_BLOCK
from .runner import ModelRunner, NodeBatch, chain_batch
from .sequence import Sequence
from .tree import TreeBatch

BINS = 20
CALIBRATION_EXTRA = 32  # extra tokens beside the roots are measured up to this many at start-up
CALIBRATION_REPEATS = 3  # timings per size, their median taken
CALIBRATION_PREFIX = 128  # over a committed prefix this long (what a request has after a short prompt)
MAX_PROBE_WAIT = 64  # steps without drafting before the SSMs are tried again, at most
PROBE_ROWS = 4  # requests a probe drafts for (those with the least to catch up): enough to learn from, cheap at any batch
MARGIN = 1.1  # speculating must promise this much more than plain decoding: what no step's prediction
# or realised rate shows (the SSMs' prompt forwards at admission, rows idle at the end of a batch, the
# timings' noise) cost 5-15% at batch 16 on the 2-core CPU, where a step's own figures break even
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

    def best(self) -> float:
        """The highest acceptance of any confidence bin verification has tested (1 before any)."""
        seen = self.tested > PRIOR_WEIGHT
        return float((self.accepted / self.tested)[seen].max()) if bool(seen.any()) else 1.0

    def observe(self, batch: TreeBatch, on_path: torch.Tensor, mine: torch.Tensor) -> None:
        """Every node whose parent was accepted was tested; those ``on_path [B, N]`` passed. Only
        nodes ``mine [B, N]`` count (the ones this model's proposer drafted)."""
        up = torch.gather(on_path, 1, batch.parents.clamp(min=0))
        tested = up & mine & batch.valid & (batch.parents >= 0)
        b = self.bins(batch.confidence[tested])
        self.tested.index_add_(0, b, torch.ones(len(b), dtype=torch.float64))
        self.accepted.index_add_(0, b, on_path[tested].double())


def path_probability(batch: TreeBatch, rate: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` probability that each node is accepted: ``rate [B, N]`` multiplied along its path
    (roots 1, padding 0)."""
    rate = torch.where(batch.parents >= 0, rate, 1.0) * batch.valid
    return torch.where(batch.ancestors, rate[:, None, :], 1.0).prod(dim=-1)


def best_nodes(batch: TreeBatch, prob: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """``[B, K]``: each request's root and its ``count`` (or ``count[b]``) nodes most likely accepted,
    ascending (so parents come first: a child is never likelier than its parent, and ties go to the
    lower index); past those, indices of padding (``TreeBatch.select`` keeps padding for them)."""
    n = prob.shape[1]
    score = torch.where(batch.valid, prob, -1.0)
    score[:, 0] = 2.0
    counts = torch.as_tensor(count).expand(prob.shape[0])
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, : int(counts.max()) + 1]
    order = torch.where(torch.arange(order.shape[1]) <= counts[:, None], order, n)
    return torch.sort(order, dim=1).values


def choose_verify_counts(gains: torch.Tensor, llm_cost: Callable[[int], float], spent: float,
                         factor: float = 1.0, tree_cost: Callable[[int], float] | None = None,
                         chains: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """How many nodes besides its root each request verifies (``[B]``), and the predicted tokens per second.

    ``gains [B, M]``: each request's path probabilities sorted descending (roots excluded, 0 past
    its tree); ``llm_cost(tokens)`` the seconds of a verification forward over ``tokens`` real
    tokens (the model skips padding, so a request verifying more nodes costs the others less)
    while every request verifies a chain, ``tree_cost(tokens)`` once one verifies a branching tree
    (``chains [B]``: how many of each request's best nodes form a chain; without them, every
    verification is priced by ``llm_cost``); ``spent`` the seconds this step already took;
    ``factor`` corrects the predicted rate of verifying drafts (``RateCorrection``). The nodes are
    taken best first across the whole batch, so a request with a promising tree verifies it while
    one with weak guesses verifies its root alone."""
    b, m = gains.shape
    flat = gains.flatten()
    order = torch.sort(flat, descending=True, stable=True).indices
    order = order[flat[order] > 0]
    cum = [0.0] + torch.cumsum(flat[order], 0).tolist()
    branching = len(cum)  # the first node count whose forward has a branching tree
    if chains is not None and tree_cost is not None:
        past = (order % m >= chains[order // m]).nonzero()
        branching = int(past[0]) + 1 if len(past) else len(cum)
    best, best_rate = 0, -1.0
    for k, gained in enumerate(cum):
        seconds = spent + (tree_cost(b + k) if k >= branching else llm_cost(b + k))
        if seconds > 0 and best_rate > 0 and (b + cum[-1]) * (factor if k else 1.0) / seconds < best_rate:
            break  # no more nodes can pay for a forward this wide (costs grow with tokens)
        rate = (b + gained) / seconds if seconds > 0 else float("inf")
        rate *= factor if k else 1.0
        if rate > best_rate:
            best, best_rate = k, rate
    return torch.bincount(order[:best] // m, minlength=b), best_rate


def choose_depth(depth_gains: torch.Tensor, llm_cost: Callable[[int], float],
                 ssm_cost: Callable[[int, bool], float], catch_up: int, level_widths: Seq[int],
                 factor: float = 1.0) -> int:
    """How deep the SSMs draft this step (0: not at all).

    ``depth_gains [B, D]``: each request's expected accepted tokens from depth ``j + 1`` (its best
    node there, recently); ``ssm_cost(tokens, tree)`` the seconds of one forward of all the SSMs
    (``tree``: a level wider than one node per request, whose siblings take the tree path and are
    observed on the SSMs' trees' curve);
    ``catch_up`` the padded catch-up tokens per request; ``level_widths[j]`` the nodes per request
    fed at level ``j + 1``; ``factor`` corrects the predicted rate of speculating. Depth ``d`` is
    costed as drafting ``d`` levels and verifying a chain of ``d`` nodes (the verification size is
    decided again once the tree is known).
    """
    b = depth_gains.shape[0]
    per_depth = depth_gains.sum(dim=0).tolist()
    best, best_rate = 0, b / llm_cost(b) if llm_cost(b) > 0 else float("inf")
    tokens, seconds = float(b), ssm_cost(b * catch_up, False)
    for d in range(1, len(level_widths) + 1):
        tokens += per_depth[d - 1]
        if d > 1:
            seconds += ssm_cost(b * level_widths[d - 2], level_widths[d - 2] > 1)
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

    def probing(self, b: int) -> bool:
        return self.plain_run.get(b, 0) >= self.wait.get(b, 2)

    def observe(self, batch: int, speculated: bool, predicted: float, realised: float) -> None:
        b = bucket(batch)
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
        """Speculating's error over plain decoding's (1 until both were seen at this batch size),
        less the ``MARGIN`` speculation must clear; 1 on probing steps."""
        b = bucket(batch)
        if self.probing(b):
            return 1.0
        spec, plain = self.error.get((b, True)), self.error.get((b, False))
        return (1.0 if spec is None or plain is None else spec / plain) / MARGIN


class AdaptivePolicy:
    """Adaptive trees' three decisions and everything they learn from, in one owner.

    ``plan``: which requests the SSMs draft this step and how deep (a request whose model-free
    trees, the suffix proposer's and the draft head's, already promise what its SSMs would add is
    left to them); ``prune``: which nodes of the merged trees are verified; ``observe``: what
    verification accepted and how the step's rate compared with the prediction. State: acceptance
    models of each proposer kind's nodes, expected gains per
    drafted depth (per cache row and overall), the probes that try drafting again while it does not
    pay, the rate correction. Forward costs are the runners' own measurements (``cost_model.py``).
    """

    def __init__(self, llm: ModelRunner, ssms: list[ModelRunner], tree: TreeConfig, rows: int,
                 free: tuple[str, ...] = ()) -> None:
        """``free``: the proposers that draft for every request without an SSM forward (``"suffix"``,
        ``"head"``), in the order of their ``TreeBatch.proposals`` columns after the SSMs'."""
        self.llm, self.ssms, self.tree, self.free = llm, ssms, tree, free
        self.ssm_acceptance = AcceptanceModel()
        self.free_acceptance = {kind: AcceptanceModel() for kind in free}
        self.rates = RateCorrection()
        self.depth_gains = torch.tensor([0.5 ** (j + 1) for j in range(tree.depth)])  # prior until drafts are seen
        self.row_gains = torch.full((rows, tree.depth), float("nan"))  # nan: the row's request has no drafts yet
        self.probe_wait, self.since_draft = 2, 0
        self.predicted_rate = 0.0  # tokens per second the current step's choice expects

    def admit(self, rows: list[int]) -> None:
        self.row_gains[rows] = float("nan")

    def gains(self, rows: list[int]) -> torch.Tensor:
        """``[B, D]`` expected accepted tokens per drafted depth: the row's recent ones, else overall."""
        g = self.row_gains[rows]
        return torch.where(torch.isnan(g), self.depth_gains, g)

    def node_rates(self, batch: TreeBatch, ssm_only: bool = False, ssm_columns: int | None = None) -> torch.Tensor:
        """``[B, N]`` P(node accepted | parent accepted): the best of its proposers' acceptance models.
        ``ssm_columns``: how many SSM columns ``batch`` has (the model-free proposers' trees alone: 0)."""
        by = batch.proposals > 0
        n = len(self.ssms) if ssm_columns is None else ssm_columns
        rate = torch.where(by[..., :n].any(dim=-1), self.ssm_acceptance.rate(batch.confidence), 0.0)
        for i, kind in enumerate(() if ssm_only else self.free):
            rate = torch.maximum(rate, torch.where(by[..., n + i], self.free_acceptance[kind].rate(batch.confidence), 0.0))
        return rate

    def worth_proposing(self, batch: int) -> bool:
        """Whether any node could pay for its token in this step's verification. A node pays only if
        it is accepted with at least the probability ``needed``: what the forward's next ``batch``
        tokens cost per token, against plain decoding's rate, less the rate correction. Where no
        acceptance model reaches it (a large batch, on a machine where speculating disappointed) the
        step proposes nothing: no suffix trees, no SSM drafts, no planning; the rate correction's
        probes (factor 1) try again now and then. The next tokens are priced as chains in a batch of
        one (the attention's cheap path), as trees beside other requests: the forward splits
        (``SplitKeys``) and extra tokens cost about what a tree's do, and in a closed batch a request
        finishing early shortens nothing, which no step's price sees."""
        one = self.llm.costs.predict(batch)
        self.predicted_rate = batch / max(one, 1e-9)
        if one <= 0:
            return True
        wider = self.llm.costs.predict(2 * batch, tree=batch > 1, rows=batch)
        needed = (wider - one) / batch * self.predicted_rate / self.rates.factor(batch)
        models = ([self.ssm_acceptance] if self.ssms else []) + list(self.free_acceptance.values())
        return needed < max(m.best() for m in models)

    def plan(self, seqs: list[Sequence], free: TreeBatch | None) -> Plan:
        """The requests the SSMs draft this step, and how deep (0: none); ``free``: the model-free
        proposers' trees, merged."""
        rows = [s.row for s in seqs]
        chosen = torch.full((len(seqs),), bool(self.ssms))
        if free is not None and self.ssms:
            promise = path_probability(free, self.node_rates(free, ssm_columns=0)).sum(dim=1) - 1
            chosen = promise < self.gains(rows).sum(dim=1)
        picked = chosen.nonzero().flatten()
        if not len(picked):
            return Plan(chosen, 0)
        lag = torch.tensor([len(s.prompt) + len(s.output) - min(s.ssm_lens) for s in seqs])[picked]  # tokens to catch up
        depth = self.draft_depth(int(lag.max()), rows, picked)
        if depth < 0:  # a probe: the requests with the least to catch up
            chosen = torch.zeros_like(chosen).index_fill_(0, picked[torch.argsort(lag, stable=True)[:PROBE_ROWS]], True)
        return Plan(chosen & (depth != 0), abs(depth))

    def draft_depth(self, catch_up: int, rows: list[int], picked: torch.Tensor) -> int:
        """How deep to draft for the requests ``picked`` (of ``rows``), from recent gains and measured
        costs; while drafting does not pay, the SSMs still draft one level now and then (ever more
        rarely) to notice when it starts to: -1, a probe, which ``plan`` gives ``PROBE_ROWS`` requests."""
        b, everyone = len(picked), len(rows)  # the others verify their roots beside the picked requests' chains
        depth = choose_depth(self.gains([rows[i] for i in picked.tolist()]),
                             lambda n: self.llm.costs.predict(n + everyone - b, tree=everyone > 1, rows=everyone),
                             lambda n, tree: sum(r.costs.predict(n, tree=tree, rows=b) for r in self.ssms), catch_up,
                             self.tree.level_widths(), self.rates.factor(len(picked)))
        if depth > 0:
            self.probe_wait, self.since_draft = 2, 0
            return depth
        self.since_draft += 1
        if self.since_draft < self.probe_wait:
            return 0
        self.probe_wait, self.since_draft = min(2 * self.probe_wait, MAX_PROBE_WAIT), 0
        return -1

    def prune(self, batch: TreeBatch, rows: list[int], plan: Plan, spent: float) -> TreeBatch:
        """Learn what each drafted depth promised, then keep the nodes that maximise the predicted
        tokens per second (``spent``: the seconds drafting took)."""
        if plan.depth:
            self.learn_depth_gains(batch, rows, plan.chosen, plan.depth)
        b = batch.tokens.shape[0]
        if batch.tokens.shape[1] == 1:
            self.predicted_rate = b / max(self.llm.costs.predict(b), 1e-9)
            return batch
        prob = path_probability(batch, self.node_rates(batch))
        gains, best = torch.sort(prob[:, 1:], dim=1, descending=True)
        depths = torch.gather(batch.depths[:, 1:], 1, best)
        chains = (depths == torch.arange(1, depths.shape[1] + 1)).int().cumprod(dim=1).sum(dim=1)  # best nodes at depths 1, 2, ...
        factor, costs = self.rates.factor(b), self.llm.costs
        counts, rate = choose_verify_counts(gains, lambda n: costs.predict(n, tree=b > 1, rows=b), spent, factor,
                                            lambda n: costs.predict(n, tree=True, rows=b), chains)
        self.predicted_rate = rate / factor if bool(counts.any()) else rate
        return batch.select(best_nodes(batch, prob, counts))

    def learn_depth_gains(self, batch: TreeBatch, rows: list[int], chosen: torch.Tensor, depth: int) -> None:
        """Each drafted request's best SSM path probability per depth, averaged with its recent ones;
        the overall gains follow every drafted request in turn."""
        prob = path_probability(batch, self.node_rates(batch, ssm_only=True))[chosen]
        depths = batch.depths[chosen]
        seen = torch.stack([torch.where(depths == d, prob, 0.0).amax(dim=1) for d in range(1, depth + 1)], dim=1)
        mine = [r for r, c in zip(rows, chosen.tolist()) if c]
        self.row_gains[mine, :depth] = 0.5 * (self.gains(mine)[:, :depth] + seen)
        k = seen.shape[0]
        weights = 0.1 * 0.9 ** torch.arange(k - 1, -1, -1, dtype=torch.float32)
        self.depth_gains[:depth] = 0.9 ** k * self.depth_gains[:depth] + (weights[:, None] * seen).sum(dim=0)

    def observe(self, batch: TreeBatch, on_path: torch.Tensor, ok: torch.Tensor, realised: float) -> None:
        """``on_path [B, N]``: the accepted nodes (roots included) of the requests ``ok [B]`` whose
        verification succeeded; ``realised``: the step's tokens per second."""
        by, n = (batch.proposals > 0) & ok[:, None, None], len(self.ssms)
        if n:
            self.ssm_acceptance.observe(batch, on_path, by[..., :n].any(dim=-1))
        for i, kind in enumerate(self.free):
            self.free_acceptance[kind].observe(batch, on_path, by[..., n + i])
        self.rates.observe(batch.tokens.shape[0], batch.tokens.shape[1] > 1, self.predicted_rate, realised)

    def calibrate(self, rows: int, tree_tokens: int) -> None:
        """Measure, before serving, the forwards adaptive trees choose between, over a committed
        prefix (a chain at no prefix costs far less than a tree of the same size after a real
        context): plain decoding (lone roots, up to ``rows``), and at batch sizes 1, 4, 16, ... up
        to ``rows`` what extra tokens add: ragged batches whose first requests verify chains, or
        branching trees, beside lone roots, up to ``tree_tokens`` per request (the LLM) or a level
        of drafts but at least 4 (the SSMs: catch-up chunks), ``CALIBRATION_EXTRA`` at most. Single timings on a loaded machine
        swing by tens of percent, so each size is the median of ``CALIBRATION_REPEATS``, and what
        extra tokens add is the median difference from plain forwards run right beside them."""
        level = max(self.tree.level_widths())
        for runner, per_request in [(self.llm, tree_tokens)] + [(r, max(level, 4)) for r in self.ssms]:
            prefix = max(0, min(CALIBRATION_PREFIX, runner.cache.slots - per_request - 1 - KEY_BLOCK))

            def seconds(nodes: NodeBatch) -> float:
                b = nodes.tokens.shape[0]
                start = time.perf_counter()
                runner.forward(list(range(b)), [prefix] * b, nodes, priced=False)
                return time.perf_counter() - start

            lone = lambda b: chain_batch([[0]] * b)  # noqa: E731
            costs = runner.costs = ForwardCosts()
            seconds(lone(rows))  # warm-up
            for n in calibration_sizes(rows):
                costs.observe(n, statistics.median(seconds(lone(n)) for _ in range(CALIBRATION_REPEATS)))
            for b in calibration_rows(rows):
                most = min(b * (per_request - 1), CALIBRATION_EXTRA)
                roots = lone(b)
                for extra in powers(most, 2) if most > 0 else []:
                    batches = {kind: ragged(b, extra, kind) for kind in ((False, True) if extra >= 2 else (False,))}
                    added: dict[bool, list[float]] = {kind: [] for kind in batches}
                    for _ in range(CALIBRATION_REPEATS):
                        plain = seconds(roots)
                        for kind, nodes in batches.items():
                            added[kind].append(seconds(nodes) - plain)
                    for kind, nodes in batches.items():  # keyed as serving keys it: real tokens, or padded ones where the model pads
                        costs.observe(runner.tokens(nodes), costs.predict(b) + statistics.median(added[kind]), kind, rows=b)


def ragged(rows: int, extra: int, branching: bool) -> NodeBatch:
    """``rows`` requests verifying ``extra`` nodes besides their roots: the first requests ``per``
    each (at least 2; the last of them what remains), as chains or as a root's children (past one
    child, a node's path is not its slots' order: the attention's tree path), the rest lone roots."""
    per = max(2, -(-extra // rows))
    sizes = torch.clamp(extra - per * torch.arange(rows), 0, per) + 1
    ids = torch.arange(per + 1)
    if branching:
        attend, depths = (ids[:, None] == ids[None, :]) | (ids[None, :] == 0), (ids > 0).long()
    else:
        attend, depths = ids[None, :] <= ids[:, None], ids
    valid = ids < sizes[:, None]
    attend = attend & valid[:, :, None] & valid[:, None, :] | torch.eye(per + 1, dtype=torch.bool)
    return NodeBatch(torch.zeros(rows, per + 1, dtype=torch.long), ids.expand(rows, per + 1), depths * valid, attend, valid)
