"""Expansion-based speculation: one SSM grows a token tree for every running request at once.

Step 0 feeds each request's tokens the SSM has not seen yet (the accepted tokens it did not
propose itself, and the new root) as one causal chunk; every further step feeds one tree level,
batched over requests, under the topology-aware mask.

Selected candidates (greedy requests, adaptive and suffix-merged trees) are the top-k of each node:
every request's tree then has the expansion's static shape, so drafting is tensors over the whole
batch, one ``topk`` per level (``draft_selected``). Sampled candidates are drawn one by one from the
SSM's distribution after the request's sampling settings, and duplicates collapse, so those trees
are grown by a ``TreeBuilder`` per request (``draft_trees``).
"""
from __future__ import annotations

import torch

from functools import lru_cache

from .config import SamplingParams, TreeConfig
from .runner import ModelRunner, NodeBatch, chain_batch
from .sampling import draw_children, target_probs, target_scores
from .sequence import Sequence
from .tree import Tree, TreeBatch, TreeBuilder, ancestor_mask, with_padding

AS_IS = SamplingParams(temperature=1.0)  # greedy requests select from the raw logits


def catch_up(runner: ModelRunner, seqs: list[Sequence], ssm: int) -> torch.Tensor:
    """Feed every request's unseen tokens up to its root; returns the SSM's logits at the roots.

    The SSMs see a prompt only when they first draft for its request (never, while the adaptive
    policy leaves drafting off), so a catch-up chunk can be a whole prompt beside a long-running
    request's few tokens: requests go in as few forwards as keep every prefix plus the longest
    chunk within the cache (``fitting_groups``)."""
    chunks = [s.tokens[s.ssm_lens[ssm]:] for s in seqs]
    starts = [s.ssm_lens[ssm] for s in seqs]
    parts = []
    for group in fitting_groups(starts, [len(c) for c in chunks], runner.cache.slots):
        logits = runner.forward(
            [seqs[i].row for i in group], [starts[i] for i in group], chain_batch([chunks[i] for i in group]),
            output_index=torch.tensor([len(chunks[i]) - 1 for i in group]),
        )
        parts.append((group, logits))
    for s in seqs:
        s.ssm_lens[ssm] = len(s.tokens) - 1  # the root is slot 0 of the tree region
    if len(parts) == 1:
        return parts[0][1]
    out = parts[0][1].new_empty(len(seqs), parts[0][1].shape[-1])
    for group, logits in parts:
        out[group] = logits
    return out


def fitting_groups(starts: list[int], lengths: list[int], slots: int) -> list[list[int]]:
    """Requests (their prefix ``starts`` and chunk ``lengths``) in groups whose widest prefix plus
    longest chunk (and the padding's scratch slot) fit ``slots``; one group unless a long chunk meets
    a long prefix."""
    groups: list[list[int]] = []
    for i in sorted(range(len(starts)), key=lambda i: -lengths[i]):
        for g in groups:  # a group's first member has its longest chunk
            if max(starts[j] for j in g + [i]) + lengths[g[0]] + 1 <= slots:
                g.append(i)
                break
        else:
            groups.append([i])
    return [sorted(g) for g in groups]


def expand(builder: TreeBuilder, seq: Sequence, parents: list[int], logits: torch.Tensor, width: int,
           replacement: bool) -> list[int]:
    """Add ``width`` children under each node of ``parents`` (logits ``[len(parents), V]``): a greedy
    request's most probable ones, a sampled request's drawn from the distribution after its settings
    (each parent then records that distribution, the stochastic verifier's ``q``). Each child records
    its draft probability as its confidence."""
    if seq.params.greedy:
        tokens, conf = select_children(logits[None], [seq.params], width)
        return [builder.add(parents[i // width], tok, confidence=c)
                for i, (tok, c) in enumerate(zip(tokens[0].tolist(), conf[0].tolist()))]
    probs = target_probs(logits, seq.params).cpu()
    new: list[int] = []
    for parent, q in zip(parents, probs):
        builder.set_draft_probs(parent, q)
        for tok in draw_children(q, width, replacement, seq.generator):
            node = builder.add(parent, tok, confidence=float(q[tok]))
            if node not in new:
                new.append(node)  # a token drawn twice is one node with two proposals
    return new


def select_children(logits: torch.Tensor, params: list[SamplingParams], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``width`` most probable children of every node (``logits [B, L, V]``, one request per
    row) and their probabilities, ``[B, L * width]`` each, children of one parent together: of the
    raw logits for greedy requests, of the distribution after the request's settings otherwise."""
    scores = target_scores(logits, [AS_IS if p.greedy else p for p in params])
    top = torch.topk(scores, width, dim=-1)
    conf = torch.exp(top.values - torch.logsumexp(scores, dim=-1, keepdim=True))
    b = logits.shape[0]
    return top.indices.reshape(b, -1), conf.reshape(b, -1)


@lru_cache(maxsize=32)
def expansion_shape(expansion: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Parents, depths and ancestors of the full tree of ``expansion``, level by level, the children
    of a node together (the order ``select_children`` returns them in)."""
    parents, depths, level = [-1], [0], [0]
    for d, width in enumerate(expansion, start=1):
        start = len(parents)
        parents += [p for p in level for _ in range(width)]
        depths += [d] * (len(parents) - start)
        level = list(range(start, len(parents)))
    parent = torch.tensor(parents)
    return parent, torch.tensor(depths), ancestor_mask(parent)


def level_batch(builders: list[TreeBuilder], levels: list[list[int]], region: int) -> NodeBatch:
    """One tree level per request, each node seeing its ancestors in the tree region."""
    t = max(len(level) for level in levels)
    b = len(levels)
    tokens, node_ids, depths = ([[0] * t for _ in range(b)] for _ in range(3))
    bi, ti, cols = [], [], []
    for i, (builder, level) in enumerate(zip(builders, levels)):
        for j, node in enumerate(level):
            tokens[i][j], node_ids[i][j], depths[i][j] = builder.tokens[node], node, builder.depths[node]
            path = builder.paths[node]
            bi += [i] * len(path)
            ti += [j] * len(path)
            cols += path
    attend = torch.zeros(b, t, region, dtype=torch.bool)
    attend[bi, ti, cols] = True
    valid = torch.arange(t)[None, :] < torch.tensor([len(level) for level in levels])[:, None]
    as_long = lambda rows: torch.tensor(rows, dtype=torch.long)  # noqa: E731
    return NodeBatch(as_long(tokens), as_long(node_ids), as_long(depths), attend, valid)


def draft_trees(runner: ModelRunner, seqs: list[Sequence], ssm: int, tree: TreeConfig, depth: int) -> list[Tree]:
    """Each request's tree from SSM ``ssm``, ``depth`` levels deep, for a batch where some requests
    sample their candidates (greedy ones select theirs; trees that select every candidate, adaptive
    and suffix-merged ones, are ``draft_selected``'s); the last level is proposed but not fed to the SSM."""
    logits = catch_up(runner, seqs, ssm)[:, None]
    builders = [TreeBuilder(s.tokens[-1], selected=s.params.greedy) for s in seqs]
    levels = [[0] for _ in seqs]
    region = tree.nodes_per_ssm() + 1
    replacement = tree.draft_sampling == "with_replacement"
    for step, width in enumerate(tree.expansion[:depth]):
        levels = [
            expand(builder, seq, level, logits[i, : len(level)], width, replacement)
            for i, (builder, seq, level) in enumerate(zip(builders, seqs, levels))
        ]
        if step + 1 < depth and any(levels):
            logits = runner.forward(
                [s.row for s in seqs], [s.ssm_lens[ssm] for s in seqs], level_batch(builders, levels, region)
            )
    return [b.build() for b in builders]


def draft_selected(runner: ModelRunner, seqs: list[Sequence], chosen: torch.Tensor, ssm: int, tree: TreeConfig,
                   depth: int, last: torch.Tensor) -> TreeBatch:
    """SSM ``ssm``'s trees of selected candidates, ``depth`` levels deep for the requests ``chosen
    [B]`` and lone roots for the others, as one batch of the expansion's shape: one forward and one
    ``topk`` per level over every chosen request."""
    picked = chosen.nonzero().flatten().tolist()
    mine = [seqs[i] for i in picked]
    params = [s.params for s in mine]
    parents, depths, anc = expansion_shape(tuple(tree.expansion[:depth]))
    n, b, region = len(parents), len(seqs), tree.nodes_per_ssm() + 1
    logits = catch_up(runner, mine, ssm)[:, None]
    tokens, confidence = [last[picked, None]], [torch.ones(len(picked), 1)]
    first = 1
    for d, width in enumerate(tree.expansion[:depth], start=1):
        toks, conf = select_children(logits, params, width)
        toks, conf = toks.cpu(), conf.cpu()  # trees live on the host; the forward moves what it feeds
        tokens.append(toks)
        confidence.append(conf)
        ids = torch.arange(first, first + toks.shape[1])
        first += toks.shape[1]
        if d < depth:
            attend = torch.zeros(len(picked), len(ids), region, dtype=torch.bool)
            attend[:, :, :n] = anc[ids]
            nodes = NodeBatch(toks, ids.expand_as(toks), depths[ids].expand_as(toks), attend,
                              torch.ones_like(toks, dtype=torch.bool))
            logits = runner.forward([s.row for s in mine], [s.ssm_lens[ssm] for s in mine], nodes)
    valid = chosen[:, None].expand(b, n).clone()
    valid[:, 0] = True
    rows = torch.tensor(picked, dtype=torch.long)

    def spread(part: torch.Tensor) -> torch.Tensor:  # the chosen requests' rows among all
        return torch.zeros((b, n), dtype=part.dtype).index_put_((rows,), part)

    all_tokens, conf = spread(torch.cat(tokens, 1)), spread(torch.cat(confidence, 1))
    all_tokens[:, 0], conf[:, 0] = last, 1.0
    proposals = valid[:, :, None].long()
    proposals[:, 0] = 0
    batch = TreeBatch(all_tokens, torch.where(valid, parents, -1), depths * valid, valid,
                      with_padding(anc, valid), conf * valid, proposals,
                      torch.where(valid, torch.arange(n), -1)[:, :, None], torch.ones(b, dtype=torch.bool), [None] * b)
    empty = valid & (conf == 0)  # a sampled request's children outside its top-k / top-p: not proposed
    if not bool(empty.any()):
        return batch
    gone = (batch.ancestors & empty[:, None, :]).any(dim=-1)  # such a node and what grew under it
    return batch.select(torch.sort(torch.where(valid & ~gone, torch.arange(n), n), dim=1).values)
