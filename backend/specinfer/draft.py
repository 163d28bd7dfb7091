"""Expansion-based speculation: one SSM grows a token tree for every running request at once.

Step 0 feeds each request's tokens the SSM has not seen yet (the accepted tokens it did not
propose itself, and the new root) as one causal chunk; every further step feeds one tree level,
batched over requests, under the topology-aware mask. Greedy requests take the SSM's top-k;
sampled ones draw their children from the SSM's distribution after the request's sampling settings.
"""
from __future__ import annotations

import torch

from .config import TreeConfig
from .runner import ModelRunner, NodeBatch, chain_batch
from .sampling import draw_children, target_probs
from .sequence import Sequence
from .tree import Tree, TreeBuilder


def catch_up(runner: ModelRunner, seqs: list[Sequence], ssm: int) -> torch.Tensor:
    """Feed every request's unseen tokens up to its root; returns the SSM's logits at the roots."""
    chunks = [s.tokens[s.ssm_lens[ssm]:] for s in seqs]
    logits = runner.forward(
        [s.row for s in seqs], [s.ssm_lens[ssm] for s in seqs], chain_batch(chunks),
        output_index=torch.tensor([len(c) - 1 for c in chunks]),
    )
    for s in seqs:
        s.ssm_lens[ssm] = len(s.tokens) - 1  # the root is slot 0 of the tree region
    return logits


def expand(builder: TreeBuilder, seq: Sequence, parents: list[int], logits: torch.Tensor, width: int,
           replacement: bool) -> list[int]:
    """Add ``width`` children under each node of ``parents`` (logits ``[len(parents), V]``).

    Greedy requests take the ``width`` most probable tokens; sampled ones too in a ``selected``
    builder (of the distribution after the request's settings), otherwise they draw children from
    that distribution. Each child records its draft probability as its confidence.
    """
    params = seq.params
    new: list[int] = []
    if params.greedy:  # the top-k logits and their probabilities, without a softmax over the vocabulary
        top = torch.topk(logits, width, dim=-1)
        conf = torch.exp(top.values.float() - torch.logsumexp(logits.float(), dim=-1, keepdim=True))
        for parent, c, tokens in zip(parents, conf.tolist(), top.indices.tolist()):
            new.extend(builder.add(parent, tok, confidence=x) for tok, x in zip(tokens, c))
        return new
    probs = target_probs(logits, params)
    if builder.selected:
        top = torch.topk(probs, width, dim=-1)
        for parent, conf, tokens in zip(parents, top.values.tolist(), top.indices.tolist()):
            new.extend(builder.add(parent, tok, confidence=c) for tok, c in zip(tokens, conf) if c > 0)
        return new
    probs = probs.cpu()
    for parent, q in zip(parents, probs):
        builder.set_draft_probs(parent, q)
        for tok in draw_children(q, width, replacement, seq.generator):
            node = builder.add(parent, tok, confidence=float(q[tok]))
            if node not in new:
                new.append(node)  # a token drawn twice is one node with two proposals
    return new


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


def draft_trees(runner: ModelRunner, seqs: list[Sequence], ssm: int, tree: TreeConfig,
                depth: int | None = None) -> list[Tree]:
    """Each request's tree from SSM ``ssm``, ``depth`` levels deep (default: the whole expansion);
    the last level is proposed but not fed to the SSM. Greedy requests and adaptive trees select
    candidates (so do trees merged with suffix trees), others sample them."""
    depth = tree.depth if depth is None else depth
    logits = catch_up(runner, seqs, ssm)[:, None]
    builders = [TreeBuilder(s.tokens[-1], selected=tree.selected or s.params.greedy) for s in seqs]
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


def ssm_accepted(tree: Tree, path: list[int], ssm: int, depth: int) -> list[int]:
    """The SSM's own nodes, root first, holding K/V for the longest accepted prefix it proposed.

    Nodes at the last level were never fed to the SSM, so they hold no K/V.
    """
    local = [0]
    for node in path:
        own = int(tree.ssm_nodes[node, ssm])
        if own < 0 or int(tree.depths[node]) >= depth:
            break
        local.append(own)
    return local
