"""Verification: which path of a speculated tree the LLM keeps, and its bonus token.

Each verifier returns, per request, the accepted nodes (root excluded, root-to-leaf order) and one
token the LLM picks itself after them. Greedy output equals the LLM's argmax decoding; the
stochastic verifiers emit tokens distributed exactly as the LLM's target distribution ``p``.
The Gumbel verifier is greedy verification of Gumbel-max samples (``sampling.gumbel_choice``): each
output position's draw is fixed by (seed, position), so it equals incremental decoding's draw.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .sampling import sample
from .tree import Tree, TreeBatch

Verdict = tuple[list[int], int]  # one request's (accepted nodes, bonus token)


@dataclass
class Verdicts:
    """Every request's accepted nodes (root excluded, root-to-leaf order, -1 past ``lengths``) and
    the bonus token after them."""

    path: torch.Tensor  # [B, D]
    lengths: torch.Tensor  # [B]
    bonus: torch.Tensor  # [B]

    @classmethod
    def from_mask(cls, on_path: torch.Tensor, bonus: torch.Tensor) -> "Verdicts":
        """From ``on_path [B, N]`` (each request's accepted nodes, root included)."""
        n = on_path.shape[1]
        lengths = on_path[:, 1:].sum(dim=1)
        index = torch.where(on_path[:, 1:], torch.arange(1, n), n)
        width = int(lengths.max()) if n > 1 else 0
        path = torch.sort(index, dim=1).values[:, :width]
        return cls(torch.where(path < n, path, -1), lengths, bonus)

    @classmethod
    def stack(cls, verdicts: list[Verdict]) -> "Verdicts":
        width = max(len(path) for path, _ in verdicts)
        path = torch.tensor([p + [-1] * (width - len(p)) for p, _ in verdicts], dtype=torch.long).view(len(verdicts), width)
        return cls(path, torch.tensor([len(p) for p, _ in verdicts]), torch.tensor([b for _, b in verdicts]))

    def nodes(self) -> torch.Tensor:
        """``[B, 1 + D]`` the accepted nodes, root first (-1 past ``lengths + 1``)."""
        return torch.cat([torch.zeros(self.path.shape[0], 1, dtype=torch.long), self.path], dim=1)

    def last_nodes(self) -> torch.Tensor:
        """``[B]`` each request's last accepted node (its root where none was): the node whose logits
        chose the bonus token, where the draft head's next tree starts."""
        return self.nodes().gather(1, self.lengths[:, None])[:, 0]

    def on_path(self, n: int) -> torch.Tensor:
        """``[B, N]`` the accepted nodes, roots included."""
        mask = torch.zeros(self.path.shape[0], n + 1, dtype=torch.bool)
        mask.scatter_(1, torch.where(self.path >= 0, self.path, n), True)
        mask[:, 0] = True
        return mask[:, :n]

    def rows(self) -> list[Verdict]:
        return [([x for x in p if x >= 0], z) for p, z in zip(self.path.tolist(), self.bonus.tolist())]


def greedy_verify(batch: TreeBatch, choice: torch.Tensor) -> Verdicts:
    """Follow, from each root, the child carrying the LLM's choice at its parent, then take the
    choice at the last node. ``choice [B, N]``: the LLM's argmax at every node (greedy requests), or
    its Gumbel-max sample there (the Gumbel verifier)."""
    parents = batch.parents.clamp(min=0)
    match = batch.valid & (batch.tokens == torch.gather(choice, 1, parents)) & (batch.parents >= 0)
    accepted = torch.zeros_like(match)
    accepted[:, 0] = True
    for _ in range(int(batch.depths.max())):
        accepted = accepted | (match & torch.gather(accepted, 1, parents))
    deepest = torch.argmax(torch.where(accepted, batch.depths, -1), dim=1)
    rows = torch.arange(choice.shape[0])
    return Verdicts.from_mask(batch.ancestors[rows, deepest] & batch.valid, choice[rows, deepest])


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """What the target becomes after a draft from ``q`` is rejected: ``norm(max(p - q, 0))``."""
    r = torch.clamp(p - q, min=0.0)
    total = r.sum()
    # p == q up to rounding: a rejection then has (numerically) zero probability, keep p.
    return p if total <= 1e-12 else r / total


def candidate_order(tree: Tree, kids: list[int], without_replacement: bool,
                    generator: torch.Generator | None) -> list[tuple[int, int]]:
    """The (child, SSM) proposals under one node, in the order the verifier must test them.

    I.i.d. draws (with replacement) are tested in uniformly random order, as in SpecInfer's
    Algorithm 2. Draws without replacement are not exchangeable, so each SSM's proposals keep their
    draw order (the order of the SSM's own node indices); SSMs take turns in a random order.
    """
    proposals = tree.proposals[kids].tolist()
    if not without_replacement:
        cands = [(c, s) for c, row in zip(kids, proposals) for s, n in enumerate(row) for _ in range(n)]
        return [cands[i] for i in torch.randperm(len(cands), generator=generator).tolist()]
    own = tree.ssm_nodes[kids].tolist()
    order: list[tuple[int, int]] = []
    for s in torch.randperm(tree.proposals.shape[1], generator=generator).tolist():
        mine = sorted((own[j][s], c) for j, c in enumerate(kids) if proposals[j][s] > 0)
        order += [(c, s) for _, c in mine]
    return order


def mss_verify(
    tree: Tree, p: torch.Tensor, generator: torch.Generator | None, without_replacement: bool = False,
    residual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = residual_distribution,
) -> Verdict:
    """Multi-step speculative sampling (SpecInfer Algorithm 2) on one request's tree.

    ``p [N, V]`` is the LLM's target distribution at every node; ``tree.draft_probs [S, N, V]`` the
    SSMs'. Every proposal of a child is a candidate, tested against the current target, which
    becomes the residual after each rejection. ``without_replacement``: each SSM drew distinct
    children, so its ``q`` loses a rejected token and is renormalised. Candidates of a ``selected``
    tree were chosen, not drawn: each is tested once, in node order, as a draw from a one-hot ``q``
    (accepted with the target's probability of it; its rejection removes it from the target).
    """
    kids = tree.children()
    tokens = tree.tokens.tolist()
    u, path = 0, []
    while True:
        target = p[u]
        if tree.selected:
            candidates = [(c, None) for c in kids[u]]
            draft = {}
        else:
            candidates = candidate_order(tree, kids[u], without_replacement, generator) if kids[u] else []
            draft = {s: tree.draft_probs[s, u] for _, s in candidates}
        for child, s in candidates:
            x = tokens[child]
            q = draft[s] if s is not None else torch.nn.functional.one_hot(torch.tensor(x), target.shape[-1]).to(target)
            if float(torch.rand((), generator=generator)) * float(q[x]) < float(target[x]):
                path.append(child)
                u = child
                break
            target = residual(target, q)
            if without_replacement and s is not None:
                q = q.clone()
                q[x] = 0.0
                draft[s] = q / q.sum() if q.sum() > 0 else q
        else:
            return path, sample(target, generator)


def naive_verify(tree: Tree, p: torch.Tensor, generator: torch.Generator | None) -> Verdict:
    """The paper's baseline: sample from the LLM at each node and go on while a child carries it."""
    kids = tree.children()
    tokens = tree.tokens.tolist()
    u, path = 0, []
    while True:
        x = sample(p[u], generator)
        child = next((c for c in kids[u] if tokens[c] == x), None)
        if child is None:
            return path, x
        path.append(child)
        u = child
