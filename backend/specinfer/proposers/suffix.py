"""Suffix proposer: token trees read from text already seen, no model forward.

Every request has an index over its prompt and committed output; the engine shares one global
index over earlier requests' outputs, bounded by a token budget (oldest evicted first). Each step,
the longest suffix of the request's tokens (up to ``max_match``) that occurred before is looked up
in both; the continuations of its latest occurrences form a trie whose nodes count the occurrences
continued through them, and the tree keeps the most often continued nodes (best first, a child is
never counted more often than its parent, so the kept nodes form a sub-tree).

Candidates are *selected*, never sampled: the stochastic verifier tests each as a one-hot draw,
which keeps sampled output exact whatever the index holds.
"""
from __future__ import annotations

import math
from collections import deque

import torch

from ..config import SuffixConfig
from ..sequence import Sequence
from ..tree import ListTree, TreeBatch, batch_of_lists
from .base import Plan

Occurrence = tuple[int, int]  # (document, position of the n-gram's last token)


class SuffixIndex:
    """Every n-gram of length 1..``max_match`` of its documents -> where it ends, oldest first.

    A document grows at its end (``extend``); documents are evicted oldest first (``evict_oldest``),
    which requires a document to be complete before a later one is added (the global index adds
    finished outputs whole; a request's own index holds one document).
    """

    def __init__(self, max_match: int) -> None:
        self.max_match = max_match
        self.docs: dict[int, list[int]] = {}
        self.order: deque[int] = deque()
        self.ends: dict[tuple[int, ...], deque[Occurrence]] = {}
        self.tokens = 0

    def extend(self, doc: int, new: list[int]) -> None:
        if doc not in self.docs:
            self.docs[doc] = []
            self.order.append(doc)
        elif doc != self.order[-1]:
            raise ValueError("only the newest document of an index can grow")
        toks, ends = self.docs[doc], self.ends
        for tok in new:
            toks.append(tok)
            p = len(toks) - 1
            at = (doc, p)
            tail = tuple(toks[max(0, p + 1 - self.max_match):])
            for k in range(1, len(tail) + 1):
                key = tail[-k:]
                occ = ends.get(key)
                if occ is None:
                    ends[key] = occ = deque()
                occ.append(at)
        self.tokens += len(new)

    def evict_oldest(self) -> None:
        doc = self.order.popleft()
        toks = self.docs.pop(doc)
        for p in range(len(toks)):
            for k in range(1, min(self.max_match, p + 1) + 1):
                key = tuple(toks[p - k + 1: p + 1])
                occ = self.ends[key]
                occ.popleft()  # this document's entries come first: it is the oldest
                if not occ:
                    del self.ends[key]
        self.tokens -= len(toks)

    def longest_match(self, context: list[int], limit: int) -> tuple[int, list[Occurrence]]:
        """The longest suffix of ``context`` (at most ``max_match``) that occurred with a token after
        it, and its ``limit`` latest such occurrences (newest first); ``(0, [])`` if none."""
        tail = tuple(context[-self.max_match:])
        for k in range(len(tail), 0, -1):
            occ = self.ends.get(tail[-k:])
            if not occ:
                continue
            found = []
            for doc, p in reversed(occ):
                if p + 1 < len(self.docs[doc]):
                    found.append((doc, p))
                    if len(found) == limit:
                        break
            if found:
                return k, found
        return 0, []

    def continuation(self, occ: Occurrence, depth: int) -> list[int]:
        doc, p = occ
        return self.docs[doc][p + 1: p + 1 + depth]


def grow_tree(root: int, continuations: list[list[int]], max_nodes: int, min_probability: float) -> tuple[ListTree, float]:
    """The selected tree of the ``max_nodes`` most frequent continuation prefixes whose share of
    ``continuations`` is at least ``min_probability``; a node's confidence is the share of its
    parent's continuations that go on through it. Also the tree's expected accepted tokens (the
    sum of its nodes' shares, if the continuations were the LLM's distribution)."""
    children: list[dict[int, int]] = [{}]
    counts, parents, tokens = [len(continuations)], [-1], [root]
    for cont in continuations:
        node = 0
        for tok in cont:
            nxt = children[node].get(tok)
            if nxt is None:
                nxt = children[node][tok] = len(tokens)
                children.append({})
                counts.append(0)
                parents.append(node)
                tokens.append(tok)
            counts[nxt] += 1
            node = nxt
    total = max(len(continuations), 1)
    floor = min_probability * total
    best = sorted((i for i in range(1, len(tokens)) if counts[i] >= floor), key=counts.__getitem__, reverse=True)  # stable: ties by index
    keep = [0] + sorted(best[:max_nodes])  # a child's count never exceeds its parent's, and it comes later
    local = {node: i for i, node in enumerate(keep)}
    tree = ListTree(tokens=[tokens[i] for i in keep], parents=[-1] + [local[parents[i]] for i in keep[1:]],
                    confidence=[1.0] + [counts[i] / counts[parents[i]] for i in keep[1:]])
    return tree, sum(counts[i] for i in keep[1:]) / total


class SuffixProposer:
    """Owns the per-request indexes and the global one; ``propose`` a tree per request each step,
    ``retain`` the running requests after it (finished outputs join the global index)."""

    name = "suffix"

    def __init__(self, config: SuffixConfig) -> None:
        self.config = config
        self.local: dict[int, tuple[Sequence, SuffixIndex]] = {}
        self.shared = SuffixIndex(config.max_match)

    def index_of(self, seq: Sequence) -> SuffixIndex:
        """The request's index, brought up to its committed tokens."""
        entry = self.local.get(seq.request_id)
        if entry is None:
            entry = self.local[seq.request_id] = (seq, SuffixIndex(self.config.max_match))
        index = entry[1]
        seen, prompt = index.tokens, seq.prompt
        if seen < len(prompt) + len(seq.output):
            index.extend(0, prompt[seen:] + seq.output if seen < len(prompt) else seq.output[seen - len(prompt):])
        return index

    def grow(self, index: SuffixIndex, context: list[int]) -> tuple[ListTree, float]:
        """The tree continuing ``context``'s longest match in ``index``, and its expected accepted tokens."""
        cfg = self.config
        k, found = index.longest_match(context, cfg.max_occurrences)
        depth = min(cfg.max_depth, math.ceil(cfg.depth_per_match * k))
        return grow_tree(context[-1], [index.continuation(o, depth) for o in found], cfg.max_nodes, cfg.min_probability)

    def propose_one(self, seq: Sequence) -> ListTree:
        """From the request's own text or from earlier outputs, whichever tree promises more
        (SuffixDecoding's choice; pooling both let a longer match in unrelated text crowd out the
        request's own repetitions)."""
        own = self.index_of(seq)
        context = own.docs[0]
        tree, score = self.grow(own, context)
        if self.shared.tokens:
            other, other_score = self.grow(self.shared, context)
            if other_score > score:
                return other
        return tree

    def propose(self, seqs: list[Sequence], last: torch.Tensor | None = None, plan: Plan | None = None) -> TreeBatch:
        """Every request's tree (no model runs: ``plan`` does not apply, ``last`` is read from the requests)."""
        return batch_of_lists([self.propose_one(s) for s in seqs], selected=True)

    def retain(self, running: list[Sequence]) -> None:
        """Forget requests no longer running; outputs of those that finished normally go to the global index."""
        alive = {s.request_id for s in running}
        for rid in [r for r in self.local if r not in alive]:
            seq, _ = self.local.pop(rid)
            if self.config.global_tokens and seq.finish_reason in ("stop", "length") and seq.output:
                self.remember(rid, seq.output)

    def remember(self, doc: int, tokens: list[int]) -> None:
        budget = self.config.global_tokens
        tokens = tokens[-budget:]
        while self.shared.tokens + len(tokens) > budget:
            self.shared.evict_oldest()
        self.shared.extend(doc, tokens)
