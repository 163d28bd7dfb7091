"""Token trees: a trie of candidate continuations, laid out parents-before-children.

Node 0 is the root (the last committed token, not yet seen by the LLM). Every other node is a
distinct token sequence and remembers its proposals: how many times each SSM drew it and, on its
parent, that SSM's draft distribution, which the stochastic verifier needs. Merging trees of several
SSMs is a prefix-trie union of their nodes with the proposals added up.

A tree's candidates are either sampled from the SSMs' distributions or *selected* (the top-k by
draft confidence, as adaptive trees and greedy decoding draft them); the stochastic verifier tests a
selected candidate as a draw from a one-hot distribution, which keeps it exact.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import torch


@dataclass
class Tree:
    tokens: torch.Tensor  # [N] token ids; tokens[0] is the root
    parents: torch.Tensor  # [N] parent index, -1 for the root; parents[i] < i
    depths: torch.Tensor  # [N] 0 for the root
    proposals: torch.Tensor  # [N, S] times SSM s proposed node i (0 for the root)
    ssm_nodes: torch.Tensor  # [N, S] index of node i in SSM s's own tree, -1 where it has none
    draft_probs: torch.Tensor | None  # [S, N, V] SSM s's distribution at node u (sampled candidates only)
    confidence: torch.Tensor  # [N] draft probability of node i given its parent (root 1)
    selected: bool = False  # candidates were selected by confidence, not sampled

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    def children(self) -> list[list[int]]:
        kids: list[list[int]] = [[] for _ in range(self.size)]
        for i, p in enumerate(self.parents.tolist()[1:], start=1):
            kids[p].append(i)
        return kids


class TreeBuilder:
    """Grows one trie; ``add`` of an existing (parent, token) adds a proposal to that node."""

    def __init__(self, root_token: int, num_ssms: int = 1, selected: bool = False) -> None:
        self.num_ssms, self.selected = num_ssms, selected
        self.tokens, self.parents, self.depths = [root_token], [-1], [0]
        self.confidence = [1.0]
        self.paths = [[0]]  # node -> the nodes from the root to it
        self.proposals = [[0] * num_ssms]
        self.ssm_nodes = [[0] * num_ssms]
        self.index: dict[tuple[int, int], int] = {}
        self.draft_probs: dict[tuple[int, int], torch.Tensor] = {}

    def add(self, parent: int, token: int, ssm: int = 0, count: int = 1, ssm_node: int = -1,
            confidence: float = 0.0) -> int:
        """``confidence``: the proposing SSM's probability of ``token`` after ``parent`` (the
        largest over SSMs is kept)."""
        node = self.index.get((parent, token))
        if node is None:
            node = len(self.tokens)
            self.index[(parent, token)] = node
            self.tokens.append(token)
            self.parents.append(parent)
            self.depths.append(self.depths[parent] + 1)
            self.paths.append(self.paths[parent] + [node])
            self.proposals.append([0] * self.num_ssms)
            self.ssm_nodes.append([-1] * self.num_ssms)
            self.confidence.append(confidence)
        self.confidence[node] = max(self.confidence[node], confidence)
        self.proposals[node][ssm] += count
        if ssm_node >= 0:
            self.ssm_nodes[node][ssm] = ssm_node
        return node

    def set_draft_probs(self, node: int, probs: torch.Tensor, ssm: int = 0) -> None:
        self.draft_probs[(ssm, node)] = probs

    def build(self) -> Tree:
        n = len(self.tokens)
        draft = None
        if self.draft_probs:
            vocab = next(iter(self.draft_probs.values())).shape[-1]
            draft = torch.zeros(self.num_ssms, n, vocab)
            for (s, u), q in self.draft_probs.items():
                draft[s, u] = q
        return Tree(
            tokens=torch.tensor(self.tokens, dtype=torch.long),
            parents=torch.tensor(self.parents, dtype=torch.long),
            depths=torch.tensor(self.depths, dtype=torch.long),
            proposals=torch.tensor(self.proposals, dtype=torch.long),
            ssm_nodes=torch.tensor(self.ssm_nodes, dtype=torch.long),
            draft_probs=draft,
            confidence=torch.tensor(self.confidence),
            selected=self.selected,
        )


def merge_trees(trees: list[Tree]) -> Tree:
    """Prefix-trie union of single-proposer trees (proposer column ``s`` built ``trees[s]``: the SSMs,
    then the suffix proposer), sharing one root; all selected or all sampled (lone roots aside)."""
    if len({t.selected for t in trees if t.size > 1}) > 1:
        raise ValueError("selected and sampled trees cannot be merged: the verifier tests them differently")
    if len(trees) == 1:  # already its own union, node ids the SSM's own
        return replace(trees[0], ssm_nodes=torch.arange(trees[0].size)[:, None])
    root = int(trees[0].tokens[0])
    builder = TreeBuilder(root, num_ssms=len(trees), selected=any(t.selected for t in trees))
    for s, tree in enumerate(trees):
        if int(tree.tokens[0]) != root:
            raise ValueError("trees to merge must share their root token")
        remap = [0] * tree.size
        counts = tree.proposals.sum(dim=1).tolist()
        conf = tree.confidence.tolist()
        for i, (tok, par) in enumerate(zip(tree.tokens.tolist(), tree.parents.tolist())):
            if i > 0:
                remap[i] = builder.add(remap[par], tok, ssm=s, count=counts[i], ssm_node=i, confidence=conf[i])
        if tree.draft_probs is not None:
            expanded = tree.draft_probs[0].sum(dim=-1) > 0
            for u in torch.nonzero(expanded).flatten().tolist():
                builder.set_draft_probs(remap[u], tree.draft_probs[0, u], ssm=s)
    return builder.build()


def prune(tree: Tree, keep: list[int]) -> Tree:
    """The sub-tree of nodes ``keep`` (ascending, root first, every kept node's parent kept)."""
    if len(keep) == tree.size:
        return tree
    index = torch.tensor(keep, dtype=torch.long)
    remap = torch.full((tree.size,), -1, dtype=torch.long)
    remap[index] = torch.arange(len(keep))
    parents = tree.parents[index]
    parents = torch.where(parents >= 0, remap[parents.clamp(min=0)], parents)
    return Tree(
        tokens=tree.tokens[index], parents=parents, depths=tree.depths[index], proposals=tree.proposals[index],
        ssm_nodes=tree.ssm_nodes[index], draft_probs=None if tree.draft_probs is None else tree.draft_probs[:, index],
        confidence=tree.confidence[index], selected=tree.selected,
    )


def root_only(token: int, num_ssms: int = 0) -> Tree:
    """The tree of plain incremental decoding: the LLM scores just the pending token."""
    return TreeBuilder(token, num_ssms).build()


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """``[..., N, N]`` with ``[i, j]`` true iff node ``j`` is node ``i`` or one of its ancestors.

    Works batched; padding nodes (parent -1 beyond the root) see only themselves. One gather per
    tree level: each node walks up to its root.
    """
    n = parents.shape[-1]
    anc = torch.eye(n, dtype=torch.bool).expand(*parents.shape, n).clone()
    node = parents
    while True:
        up = node >= 0
        if not up.any():
            return anc
        hit = torch.zeros_like(anc)
        hit.scatter_(-1, node.clamp(min=0).unsqueeze(-1), up.unsqueeze(-1))
        anc |= hit
        node = torch.where(up, torch.gather(parents, -1, node.clamp(min=0)), node)


@dataclass
class TreeBatch:
    """Trees of several requests padded to one size for a single batched forward."""

    tokens: torch.Tensor  # [B, N]
    parents: torch.Tensor  # [B, N], -1 for roots and padding
    depths: torch.Tensor  # [B, N]
    valid: torch.Tensor  # [B, N] false on padding
    ancestors: torch.Tensor  # [B, N, N]


@lru_cache(maxsize=256)
def tree_layout(shapes: tuple[tuple[int, ...], ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Parents, depths, valid and ancestors of a batch of tree shapes (each a tuple of parents).

    A static expansion has one shape per step and adaptive trees a handful: computed once each.
    """
    n, b = max(len(s) for s in shapes), len(shapes)
    parents = torch.full((b, n), -1, dtype=torch.long)
    valid = torch.zeros(b, n, dtype=torch.bool)
    for i, shape in enumerate(shapes):
        parents[i, : len(shape)] = torch.tensor(shape, dtype=torch.long)
        valid[i, : len(shape)] = True
    anc = ancestor_mask(parents)
    return parents, (anc.sum(dim=-1) - 1) * valid, valid, anc


def pad_trees(trees: list[Tree]) -> TreeBatch:
    parents, depths, valid, anc = tree_layout(tuple(tuple(t.parents.tolist()) for t in trees))
    tokens = torch.zeros(valid.shape, dtype=torch.long)
    for i, t in enumerate(trees):
        tokens[i, : t.size] = t.tokens
    return TreeBatch(tokens, parents, depths, valid, anc)


def path_to(parents: list[int], node: int) -> list[int]:
    """Nodes from the root's child down to ``node`` (the root itself excluded)."""
    path = []
    while node > 0:
        path.append(node)
        node = parents[node]
    return path[::-1]
