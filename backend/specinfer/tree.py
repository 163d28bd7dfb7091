"""Token trees: a trie of candidate continuations, laid out parents-before-children.

Node 0 is the root (the last committed token, not yet seen by the LLM). Every other node is a
distinct token sequence and remembers its proposals: how many times each proposer (the SSMs, the
suffix proposer) proposed it and, on its parent, that SSM's draft distribution, which the stochastic
verifier needs. Merging the trees of several proposers is a prefix-trie union of their nodes with the
proposals added up, batched over requests (``merge``).

A tree's candidates are either sampled from the SSMs' distributions or *selected* (the top-k by
draft confidence, as adaptive trees and greedy decoding draft them); the stochastic verifier tests a
selected candidate as a draw from a one-hot distribution, which keeps it exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence


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
    """Grows one proposer's trie node by node (candidates sampled one by one, or a suffix match's
    continuations); ``add`` of an existing (parent, token) adds a proposal to that node."""

    def __init__(self, root_token: int, selected: bool = False) -> None:
        self.selected = selected
        self.tokens, self.parents, self.depths = [root_token], [-1], [0]
        self.confidence = [1.0]
        self.paths = [[0]]  # node -> the nodes from the root to it
        self.proposals = [0]
        self.index: dict[tuple[int, int], int] = {}
        self.draft_probs: dict[int, torch.Tensor] = {}

    def add(self, parent: int, token: int, count: int = 1, confidence: float = 0.0) -> int:
        """``confidence``: the proposer's probability of ``token`` after ``parent`` (the largest is kept)."""
        node = self.index.get((parent, token))
        if node is None:
            node = len(self.tokens)
            self.index[(parent, token)] = node
            self.tokens.append(token)
            self.parents.append(parent)
            self.depths.append(self.depths[parent] + 1)
            self.paths.append(self.paths[parent] + [node])
            self.proposals.append(0)
            self.confidence.append(confidence)
        self.confidence[node] = max(self.confidence[node], confidence)
        self.proposals[node] += count
        return node

    def set_draft_probs(self, node: int, probs: torch.Tensor) -> None:
        self.draft_probs[node] = probs

    def build(self) -> Tree:
        n = len(self.tokens)
        draft = None
        if self.draft_probs:
            vocab = next(iter(self.draft_probs.values())).shape[-1]
            draft = torch.zeros(1, n, vocab)
            for u, q in self.draft_probs.items():
                draft[0, u] = q
        return Tree(
            tokens=torch.tensor(self.tokens, dtype=torch.long),
            parents=torch.tensor(self.parents, dtype=torch.long),
            depths=torch.tensor(self.depths, dtype=torch.long),
            proposals=torch.tensor(self.proposals, dtype=torch.long)[:, None],
            ssm_nodes=torch.arange(n)[:, None],
            draft_probs=draft,
            confidence=torch.tensor(self.confidence),
            selected=self.selected,
        )


def root_only(token: int) -> Tree:
    """The tree of plain incremental decoding: the LLM scores just the pending token."""
    return TreeBuilder(token).build()


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


def with_padding(anc: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, N, N]`` ancestors of the valid nodes; a padding node sees itself only (attention needs a key)."""
    return (anc & valid[:, :, None]) | torch.eye(anc.shape[-1], dtype=torch.bool)


@dataclass
class TreeBatch:
    """Every running request's tree, padded to one size: the step's one tree type from proposal to
    commit. Proposer column ``p`` of ``proposals``/``ssm_nodes``: the SSMs in order, then the suffix
    proposer, then the draft head (the engine's ``columns``). Batch operations (``merge``, ``select``, verification, commit) are tensor operations
    over all requests; ``tree(b)`` is one request's view for the verifiers that sample one by one."""

    tokens: torch.Tensor  # [B, N]
    parents: torch.Tensor  # [B, N], -1 for roots and padding
    depths: torch.Tensor  # [B, N]
    valid: torch.Tensor  # [B, N] false on padding
    ancestors: torch.Tensor  # [B, N, N]
    confidence: torch.Tensor  # [B, N] draft probability given the parent (roots 1, padding 0)
    proposals: torch.Tensor  # [B, N, P] times proposer p proposed the node
    ssm_nodes: torch.Tensor  # [B, N, P] the node's index in proposer p's own tree, -1 where it has none
    selected: torch.Tensor  # [B] candidates selected by confidence, not sampled
    draft_probs: list[torch.Tensor | None]  # per request ``[P, N, V]``: sampled candidates only

    @property
    def sizes(self) -> torch.Tensor:
        return self.valid.sum(dim=1)

    def tree(self, b: int) -> Tree:
        n = int(self.valid[b].sum())
        return Tree(self.tokens[b, :n], self.parents[b, :n], self.depths[b, :n], self.proposals[b, :n],
                    self.ssm_nodes[b, :n], self.draft_probs[b], self.confidence[b, :n], bool(self.selected[b]))

    def select(self, keep: torch.Tensor) -> "TreeBatch":
        """The sub-trees of nodes ``keep [B, K]`` (ascending per request, root first, every kept
        node's parent kept; an index of padding, or past the batch's width, keeps padding)."""
        b, n = self.tokens.shape
        rows = torch.arange(b)[:, None]
        safe = keep.clamp(max=n - 1)
        valid = (keep < n) & self.valid[rows, safe]
        remap = torch.full((b, n + 1), -1, dtype=torch.long)
        remap.scatter_(1, torch.where(valid, keep, n), torch.arange(keep.shape[1]).expand_as(keep).clone())
        old = self.parents[rows, safe]
        parents = torch.where(valid & (old >= 0), remap[rows, old.clamp(min=0)], -1)
        draft = [None if q is None else q[:, safe[i][valid[i]]] for i, q in enumerate(self.draft_probs)]
        anc = with_padding(self.ancestors[rows[:, :, None], safe[:, :, None], safe[:, None, :]] & valid[:, None, :], valid)
        return TreeBatch(
            self.tokens[rows, safe] * valid, parents, self.depths[rows, safe] * valid, valid, anc,
            self.confidence[rows, safe] * valid, self.proposals[rows, safe] * valid[:, :, None],
            torch.where(valid[:, :, None], self.ssm_nodes[rows, safe], -1), self.selected, draft,
        )


def pad_trees(trees: list[Tree]) -> TreeBatch:
    """Stack single trees (one proposer column each, or already merged ones) into a batch."""
    def pad(field: str, value: int | float = 0) -> torch.Tensor:
        return pad_sequence([getattr(t, field) for t in trees], batch_first=True, padding_value=value)

    parents = pad("parents", -1)
    sizes = torch.tensor([t.size for t in trees])
    n = parents.shape[1]
    valid = torch.arange(n) < sizes[:, None]
    return TreeBatch(pad("tokens"), parents, pad("depths"), valid, with_padding(ancestor_mask(parents), valid),
                     pad("confidence"), pad("proposals"),
                     pad("ssm_nodes", -1), torch.tensor([t.selected for t in trees]), [t.draft_probs for t in trees])


@dataclass
class ListTree:
    """One proposer's tree as Python lists (root first, parents before children): how the suffix
    proposer grows its trees, with no tensor per request; ``batch_of_lists`` stacks them."""

    tokens: list[int]
    parents: list[int]  # -1 for the root
    confidence: list[float]  # 1.0 for the root

    @property
    def size(self) -> int:
        return len(self.tokens)


def batch_of_lists(trees: list[ListTree], selected: bool) -> TreeBatch:
    """Stack list trees into a one-proposer batch: every field as one flat list over the batch, made
    one numpy array (ancestors set from each node's path), each tensor a view of it; the suffix
    proposer's per-step cost is mostly this packing, so it is a handful of array calls whatever the batch."""
    b, n = len(trees), max(t.size for t in trees)
    tokens, parents, depths, own, proposals, confidence = [], [], [], [], [], []  # own: node id, -1 on padding
    seen: list[int] = []  # flat [B, N, N] indices of the ancestor pairs; padding sees itself
    for r, t in enumerate(trees):
        k, base = t.size, r * n * n
        depth = [0] * k
        paths: list[list[int]] = []
        for i, p in enumerate(t.parents):
            if p >= 0:
                paths.append(paths[p] + [i])
                depth[i] = depth[p] + 1
            else:
                paths.append([i])
            row = base + i * n
            seen += [row + j for j in paths[i]]
        seen += range(base + k * (n + 1), base + n * n, n + 1)
        tokens += t.tokens
        parents += t.parents
        depths += depth
        own += range(k)
        proposals += [0] + [1] * (k - 1)
        confidence += t.confidence
        if k < n:
            zeros, none = [0] * (n - k), [-1] * (n - k)
            tokens += zeros
            parents += none
            depths += zeros
            own += none
            proposals += zeros
            confidence += zeros
    ints = np.array((tokens, parents, depths, own, proposals), dtype=np.int64).reshape(5, b, n, 1)
    anc = np.zeros(b * n * n, dtype=np.bool_)
    anc[seen] = True
    tensor = torch.from_numpy
    return TreeBatch(tensor(ints[0, :, :, 0]), tensor(ints[1, :, :, 0]), tensor(ints[2, :, :, 0]),
                     tensor(ints[3, :, :, 0] >= 0), tensor(anc).view(b, n, n),
                     tensor(np.array(confidence, dtype=np.float32).reshape(b, n)), tensor(ints[4]), tensor(ints[3]),
                     torch.full((b,), selected), [None] * b)


def roots(tokens: torch.Tensor, proposers: int) -> TreeBatch:
    """Lone roots: the trees of plain incremental decoding (the LLM scores just the pending token)."""
    b = tokens.shape[0]
    return TreeBatch(tokens[:, None].clone(), torch.full((b, 1), -1), torch.zeros(b, 1, dtype=torch.long),
                     torch.ones(b, 1, dtype=torch.bool), torch.ones(b, 1, 1, dtype=torch.bool), torch.ones(b, 1),
                     torch.zeros(b, 1, proposers, dtype=torch.long), torch.zeros(b, 1, proposers, dtype=torch.long),
                     torch.zeros(b, dtype=torch.bool), [None] * b)


def merge(batches: list[TreeBatch]) -> TreeBatch:
    """Prefix-trie union, request by request and all at once, of trees sharing their roots (proposer
    columns concatenated in order). Nodes keep the order of their first appearance, so the merged
    tree lists parents before children; a node's proposals add up, its confidence is the largest.
    Lone-root sources (a proposer with nothing this step) add their columns, never nodes."""
    if len(batches) == 1:
        return batches[0]
    for x in batches[1:]:
        if not bool((x.tokens[:, 0] == batches[0].tokens[:, 0]).all()):
            raise ValueError("trees to merge must share their root token")
    many = torch.stack([x.sizes > 1 for x in batches], 1)
    chosen = torch.stack([x.selected for x in batches], 1)
    if bool(((chosen & many).any(1) & (~chosen & many).any(1)).any()):
        raise ValueError("selected and sampled trees cannot be merged: the verifier tests them differently")
    offset: dict[int, int] = {}  # grown source's index -> where its nodes start in the concatenation
    for i in [i for i, x in enumerate(batches) if x.tokens.shape[1] > 1] or [0]:
        offset[i] = sum(batches[j].tokens.shape[1] for j in offset)
    grown, offsets = [batches[i] for i in offset], list(offset.values())
    b = batches[0].tokens.shape[0]
    tokens = torch.cat([x.tokens for x in grown], 1)
    depths = torch.cat([x.depths for x in grown], 1)
    valid = torch.cat([x.valid for x in grown], 1)
    parents = torch.cat([torch.where(x.parents >= 0, x.parents + o, -1) for x, o in zip(grown, offsets)], 1)
    m = tokens.shape[1]
    index = torch.arange(m).expand(b, m)
    # canon[i]: the first node with node i's (canonical parent, token), decided level by level; one
    # source's nodes are distinct already
    canon = torch.where(depths == 0, 0, index)
    for d in range(1, int(depths.max()) + 1 if len(grown) > 1 else 1):
        level = valid & (depths == d)
        up = torch.gather(canon, 1, parents.clamp(min=0))
        same = (level[:, :, None] & level[:, None, :] & (up[:, :, None] == up[:, None, :])
                & (tokens[:, :, None] == tokens[:, None, :]))
        canon = torch.where(level, same.int().argmax(dim=2), canon)
    first = valid & (canon == index)
    order = torch.argsort((~first).int(), dim=1, stable=True)  # first appearances, in order
    n = int(first.sum(1).max())
    keep = order[:, :n]
    new_id = torch.cumsum(first.long(), 1) - 1
    target = torch.gather(new_id, 1, canon)  # [B, M] each node's merged index
    rows = torch.arange(b)[:, None]
    kept_valid = first[rows, keep]
    old_parent = parents[rows, keep]
    merged_parents = torch.where(kept_valid & (old_parent >= 0), target[rows, old_parent.clamp(min=0)], -1)
    # each source's nodes -> merged ids (padding -> a spill column n; a lone root -> the root)
    at = [torch.where(x.valid, target[:, offset[i]: offset[i] + x.tokens.shape[1]], n) if i in offset
          else torch.zeros(b, 1, dtype=torch.long) for i, x in enumerate(batches)]
    cols = [x.proposals.shape[2] for x in batches]
    proposals = torch.zeros(b, n, sum(cols), dtype=torch.long)
    ssm_nodes = torch.full((b, n, sum(cols)), -1, dtype=torch.long)
    confidence = torch.zeros(b, n)
    col = 0
    for x, a, c in zip(batches, at, cols):
        k = a.shape[1]
        spill = torch.zeros(b, n + 1, c, dtype=torch.long)
        proposals[:, :, col: col + c] = spill.scatter_add(1, a[:, :, None].expand(b, k, c), x.proposals)[:, :n]
        own = torch.full((b, n + 1, c), -1, dtype=torch.long)
        ssm_nodes[:, :, col: col + c] = own.scatter(1, a[:, :, None].expand(b, k, c), x.ssm_nodes)[:, :n]
        conf = torch.zeros(b, n + 1).scatter_reduce(1, a, x.confidence, "amax")
        confidence = torch.maximum(confidence, conf[:, :n])
        col += c
    ssm_nodes[:, 0] = 0
    draft = [_merged_draft_probs(batches, at, r, n) for r in range(b)]
    if len(grown) == 1:  # the source's own ancestors, on the kept nodes
        anc = grown[0].ancestors[rows[:, :, None], keep[:, :, None], keep[:, None, :]] & kept_valid[:, None, :]
    else:
        anc = ancestor_mask(merged_parents)
    anc = with_padding(anc, kept_valid)
    return TreeBatch(tokens[rows, keep] * kept_valid, merged_parents, depths[rows, keep] * kept_valid, kept_valid, anc,
                     confidence * kept_valid, proposals, ssm_nodes, (chosen & many).any(1), draft)


def _merged_draft_probs(batches: list[TreeBatch], at: list[torch.Tensor], r: int, n: int) -> torch.Tensor | None:
    """Request ``r``'s draft distributions on the merged node ids (sampled candidates only)."""
    sources = [x.draft_probs[r] for x in batches]
    if all(q is None for q in sources):
        return None
    vocab = next(q for q in sources if q is not None).shape[-1]
    out = torch.zeros(sum(x.proposals.shape[2] for x in batches), n, vocab)
    col = 0
    for x, a, q in zip(batches, at, sources):
        c, k = x.proposals.shape[2], int(x.valid[r].sum())
        if q is not None:
            out[col: col + c, a[r, :k]] = q[:, :k]
        col += c
    return out


def path_to(parents: list[int], node: int) -> list[int]:
    """Nodes from the root's child down to ``node`` (the root itself excluded)."""
    path = []
    while node > 0:
        path.append(node)
        node = parents[node]
    return path[::-1]
