"""Stochastic verification emits tokens distributed exactly as the LLM samples them.

A mock LLM and mock SSMs have known distributions at every prefix over a 5-token vocabulary. The
real drafting (``draft.expand``, ``draft.select_children``), merging, adaptive pruning and verifiers decode the first two tokens many times; the
empirical joint distribution must lie within a total-variation bound of the exact one. The bound is
E[TV] (from the exact distribution and the sample count) plus a McDiarmid deviation at 1e-5, so a
correct verifier fails it with probability < 1e-5 (and never, given the fixed seeds); a verifier
that skips the residual update must exceed it. The Gumbel verifier (greedy verification of Gumbel-max samples
keyed by seed and output position) passes the same test, and fails it when the noise is reused
across positions.
"""
from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace
from functools import lru_cache

import pytest
import torch

from dataclasses import replace

from specinfer import SamplingParams
from specinfer.adaptive import best_nodes, path_probability
from specinfer.config import SuffixConfig
from specinfer.draft import expand, select_children
from specinfer.proposers import DraftHead, HeadProposer, SuffixProposer
from specinfer.sampling import gumbel_choice, make_generator
from specinfer.sequence import Sequence
from specinfer.tree import TreeBuilder, merge, pad_trees
from specinfer.verify import greedy_verify, mss_verify, naive_verify

V = 5
SAMPLES = 5000


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Thousands of 5-token tensors: intra-op threads only add overhead (10x on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@lru_cache(maxsize=None)
def base_logits(model: int, prefix: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash((model, prefix)) % (2**31))
    return torch.randn(V, generator=g)


def llm_logits(prefix: tuple[int, ...]) -> torch.Tensor:
    return 1.2 * base_logits(0, prefix)


def ssm_logits(ssm: int, prefix: tuple[int, ...]) -> torch.Tensor:
    # Correlated with the LLM (so deep nodes get accepted) but sharper and biased: a wrong
    # verifier shows.
    return 1.5 * base_logits(0, prefix) + 2.0 * base_logits(ssm + 1, prefix)


def draft(root_prefix: tuple[int, ...], ssm: int, expansion: tuple[int, ...], replacement: bool, seq: Sequence,
          selected: bool = False):
    """The engine's drafting by the mock SSM: sampled candidates (``draft.expand``) or selected ones
    (``draft.select_children``, the top-k of each node)."""
    builder = TreeBuilder(root_prefix[-1], selected=selected)
    prefixes = {0: root_prefix}
    level = [0]
    for width in expansion:
        logits = torch.stack([ssm_logits(ssm, prefixes[u]) for u in level])
        if selected:
            tokens, conf = select_children(logits[None], [seq.params], width)
            level = [builder.add(level[i // width], t, confidence=c)
                     for i, (t, c) in enumerate(zip(tokens[0].tolist(), conf[0].tolist()))]
        else:
            level = expand(builder, seq, level, logits, width, replacement)
        for node in level:
            prefixes[node] = prefixes[builder.parents[node]] + (builder.tokens[node],)
    return builder.build(), prefixes


HISTORY = [0, 1, 2, 0, 1, 3, 0, 1, 2, 4, 0, 2, 1, 0, 1, 2, 3]  # text the suffix proposer has seen


def suffix_tree(committed: tuple[int, ...]):
    """The suffix proposer's tree after ``HISTORY + committed`` (a request's own earlier text)."""
    proposer = SuffixProposer(SuffixConfig(max_match=3, max_nodes=6, min_probability=0.05))
    return proposer.propose([Sequence(0, HISTORY + list(committed), SamplingParams(temperature=1.0), frozenset(), None)]).tree(0)


@lru_cache(maxsize=1)
def head_proposer() -> HeadProposer:
    """A draft head with random weights over the 5-token vocabulary (2 children, then a chain)."""
    g = torch.Generator().manual_seed(5)
    head = DraftHead(6, 12, torch.arange(V))
    with torch.no_grad():
        for w in head.parameters():
            w.copy_(torch.randn(w.shape, generator=g))
    return HeadProposer(head, torch.randn(V, 6, generator=g), torch.randn(V, 6, generator=g), SAMPLES, (2, 1))


@lru_cache(maxsize=None)
def head_state(prefix: tuple[int, ...]) -> torch.Tensor:
    """The mock LLM's hidden state after ``prefix``, which the head drafts from."""
    return torch.randn(6, generator=torch.Generator().manual_seed(hash((-1, prefix)) % (2**31)))


def head_trees(committed: list[tuple[int, ...]]):
    """The draft head's trees for every sample, as the engine drafts them: one batch."""
    proposer = head_proposer()
    rows = list(range(len(committed)))
    proposer.remember(rows, torch.stack([head_state(c) for c in committed]))
    return proposer.propose([SimpleNamespace(row=r) for r in rows], torch.tensor([c[-1] for c in committed]))


def decode_step(shapes: tuple[tuple[int, ...], ...], method: str, seq: Sequence, committed: list[tuple[int, ...]],
                seeds: list[int], residual=None) -> list[list[int]]:
    """One speculation step of every unfinished sample at once, as the engine runs it: each sample's
    trees drafted by the mock SSMs (and its suffix tree), merged and pruned as one batch, verified
    (the Gumbel verifier batched; the sampling verifiers one by one). Returns the emitted tokens."""
    adaptive = "adaptive" in method
    if method.startswith("suffix"):  # the suffix tree, alone or merged with an SSM's selected tree
        sources = [[draft(c, s, shape, True, seq, True)[0] for c in committed] for s, shape in enumerate(shapes)]
        sources.append([suffix_tree(c) for c in committed])
    else:
        sources = [[draft(c, s, shape, method != "mss_without", seq, adaptive)[0] for c in committed]
                   for s, shape in enumerate(shapes)]
    batches = [pad_trees(trees) for trees in sources]
    if method.startswith("head"):  # the head's trees, alone or merged with the suffix proposer's and an SSM's
        batches = [pad_trees([draft(c, s, shape, True, seq, True)[0] for c in committed]) for s, shape in enumerate(shapes)]
        batches += [pad_trees([suffix_tree(c) for c in committed])] if shapes else []
        batches.append(head_trees(committed))
    batch = merge(batches)
    if adaptive or method in ("suffix_merged", "head_merged"):  # the nodes most likely accepted, as many as a random cost model would take
        keep = torch.stack([torch.randint(0, int(n), (), generator=seq.generator) for n in batch.sizes])
        batch = batch.select(best_nodes(batch, path_probability(batch, batch.confidence), keep))
    trees = [batch.tree(b) for b in range(len(committed))]
    prefixes = []
    for tree, c in zip(trees, committed):
        node_prefix = {0: c}
        for i in range(1, tree.size):
            node_prefix[i] = node_prefix[int(tree.parents[i])] + (int(tree.tokens[i]),)
        prefixes.append(node_prefix)
    scores = torch.zeros(*batch.tokens.shape, V)
    for b, node_prefix in enumerate(prefixes):
        scores[b, : len(node_prefix)] = torch.stack([llm_logits(node_prefix[i]) for i in range(len(node_prefix))])
    if method.startswith("gumbel"):  # reused: the deliberate bug of one noise vector for every position
        reused = method.endswith("reused")
        first = torch.tensor([0 if reused else len(c) - 1 for c in committed])
        depths = torch.zeros_like(batch.depths) if reused else batch.depths
        verdicts = greedy_verify(batch, gumbel_choice(scores, seeds, first, depths)).rows()
    else:
        verdicts = []
        for b, (tree, node_prefix) in enumerate(zip(trees, prefixes)):
            p = torch.softmax(scores[b, : tree.size], dim=-1)
            if method == "adaptive_as_sampled":  # the deliberate bug: selected candidates tested as draws from q
                q = torch.stack([torch.stack([torch.softmax(ssm_logits(s, node_prefix[u]), -1) for u in range(tree.size)])
                                 for s in range(len(shapes))])
                tree = replace(tree, selected=False, draft_probs=q)
            if method in ("suffix_trusted", "head_trusted"):  # the deliberate bug: candidates taken as draws from the LLM itself
                tree = replace(tree, selected=False, draft_probs=p[None])
            if method == "naive":
                verdicts.append(naive_verify(tree, p, seq.generator))
            else:
                kwargs = {"residual": residual} if residual else {}
                verdicts.append(mss_verify(tree, p, seq.generator, without_replacement=method == "mss_without", **kwargs))
    return [tree.tokens[path].tolist() + [bonus] for tree, (path, bonus) in zip(trees, verdicts)]


def exact_two() -> dict[tuple[int, int], float]:
    first = torch.softmax(llm_logits((0,)), dim=-1)
    return {
        (a, b): float(first[a] * torch.softmax(llm_logits((0, a)), dim=-1)[b]) for a in range(V) for b in range(V)
    }


def tv_and_bound(counts: Counter, n: int) -> tuple[float, float]:
    exact = exact_two()
    tv = 0.5 * sum(abs(counts.get(k, 0) / n - p) for k, p in exact.items())
    expected = 0.5 * sum(math.sqrt(p * (1 - p) / n) for p in exact.values())
    return tv, expected + math.sqrt(math.log(1e5) / (2 * n))


def empirical(shapes, method, seed: int, residual=None) -> Counter:
    """The first two tokens of ``SAMPLES`` requests (each its own Gumbel seed), decoded step by step."""
    seq = Sequence(0, [0], SamplingParams(temperature=1.0), frozenset(), make_generator(seed))
    seeds = [seed * SAMPLES + i for i in range(SAMPLES)]
    outs: list[list[int]] = [[] for _ in range(SAMPLES)]
    while todo := [i for i in range(SAMPLES) if len(outs[i]) < 2]:
        emitted = decode_step(shapes, method, seq, [(0, *outs[i]) for i in todo], [seeds[i] for i in todo], residual)
        for i, tokens in zip(todo, emitted):
            outs[i] += tokens
    return Counter((out[0], out[1]) for out in outs)


TREES = {
    "chain": ((1, 1, 1),),
    "star": ((4,),),
    "unbalanced": ((1, 3, 1),),
    "two_ssms_merged": ((2, 1), (1, 2)),
}


@pytest.mark.parametrize("method", ["mss_with", "mss_without", "naive", "gumbel"])
@pytest.mark.parametrize("tree", sorted(TREES))
def test_verifier_preserves_llm_distribution(tree, method):
    tv, bound = tv_and_bound(empirical(TREES[tree], method, seed=1234), SAMPLES)
    assert tv < bound, f"TV {tv:.4f} >= bound {bound:.4f}"


@pytest.mark.parametrize("verifier", ["mss", "gumbel"])
@pytest.mark.parametrize("tree", sorted(TREES))
def test_adaptive_trees_preserve_llm_distribution(tree, verifier):
    """Candidates selected by confidence and pruned, tested as one-hot draws (MSS) or against the
    Gumbel-max sample: still exact."""
    method = "adaptive" if verifier == "mss" else "gumbel_adaptive"
    tv, bound = tv_and_bound(empirical(TREES[tree], method, seed=1234), SAMPLES)
    assert tv < bound, f"TV {tv:.4f} >= bound {bound:.4f}"


@pytest.mark.parametrize("tree", ["chain", "star"])
def test_gumbel_noise_reused_across_positions_fails_the_same_test(tree):
    tv, bound = tv_and_bound(empirical(TREES[tree], "gumbel_reused", seed=1234), SAMPLES)
    assert tv > bound, f"wrong verifier went unnoticed: TV {tv:.4f} <= bound {bound:.4f}"


@pytest.mark.parametrize("tree", ["star"])
def test_selected_candidates_tested_as_sampled_fail_the_same_test(tree):
    tv, bound = tv_and_bound(empirical(TREES[tree], "adaptive_as_sampled", seed=1234), SAMPLES)
    assert tv > bound, f"wrong verifier went unnoticed: TV {tv:.4f} <= bound {bound:.4f}"


@pytest.mark.parametrize("tree", ["star", "two_ssms_merged"])
def test_verifier_without_residual_update_fails_the_same_test(tree):
    skip_residual = lambda p, q: p  # noqa: E731 - the deliberate bug
    tv, bound = tv_and_bound(empirical(TREES[tree], "mss_with", seed=1234, residual=skip_residual), SAMPLES)
    assert tv > bound, f"wrong verifier went unnoticed: TV {tv:.4f} <= bound {bound:.4f}"


@pytest.mark.parametrize("method", ["suffix", "suffix_merged", "head", "head_merged"])
def test_suffix_and_head_trees_preserve_llm_distribution(method):
    """Suffix candidates (continuations of earlier text) and the draft head's (its top children, level
    by level) are selected, tested as one-hot draws: exact, alone and merged (suffix with an SSM's
    selected tree; the head's with both), pruned at random as a cost model might."""
    shapes = ((1, 2),) if method.endswith("merged") else ()
    tv, bound = tv_and_bound(empirical(shapes, method, seed=1234), SAMPLES)
    assert tv < bound, f"TV {tv:.4f} >= bound {bound:.4f}"


@pytest.mark.parametrize("method", ["suffix_trusted", "head_trusted"])
def test_suffix_and_head_candidates_trusted_as_draws_from_the_llm_fail_the_same_test(method):
    tv, bound = tv_and_bound(empirical((), method, seed=1234), SAMPLES)
    assert tv > bound, f"wrong verifier went unnoticed: TV {tv:.4f} <= bound {bound:.4f}"
