"""The suffix proposer: its index against brute force, its trees' limits, and exact greedy output."""
from __future__ import annotations

import random

import pytest

from conftest import prompts, trees_pay
from specinfer import SamplingParams, SpecInferEngine, TreeConfig
from specinfer.config import SuffixConfig
from specinfer.proposers import SuffixIndex, SuffixProposer, grow_tree
from specinfer.sampling import make_generator
from specinfer.sequence import Sequence

PROMPTS = prompts(8, seed=41)
PARAMS = [SamplingParams(max_tokens=10 + (i * 7) % 17, ignore_eos=True) for i in range(len(PROMPTS))]


def brute_force(docs: list[list[int]], context: list[int], max_match: int) -> tuple[int, set[tuple[int, int]]]:
    """Longest suffix of ``context`` that occurred with a continuation, and every such occurrence."""
    for k in range(min(max_match, len(context)), 0, -1):
        key = context[-k:]
        found = {(d, p) for d, toks in enumerate(docs) for p in range(k - 1, len(toks) - 1)
                 if toks[p - k + 1: p + 1] == key}
        if found:
            return k, found
    return 0, set()


@pytest.mark.parametrize("seed", range(4))
def test_index_finds_what_brute_force_finds_as_streams_grow(seed):
    rng = random.Random(seed)
    index, docs = SuffixIndex(max_match=5), []
    for d in range(3):
        docs.append([])
        for _ in range(6):  # a document grows in chunks, queried after each
            chunk = [rng.randrange(4) for _ in range(rng.randrange(1, 9))]
            docs[-1] += chunk
            index.extend(d, chunk)
            for _ in range(5):
                context = [rng.randrange(4) for _ in range(rng.randrange(1, 8))]
                k, occ = index.longest_match(context, limit=10_000)
                assert (k, set(occ)) == brute_force(docs, context, 5)
                assert occ == sorted(occ, key=lambda o: (o[0], o[1]), reverse=True)  # newest first
    assert index.tokens == sum(map(len, docs))


def test_eviction_forgets_the_oldest_documents():
    rng = random.Random(7)
    docs = [[rng.randrange(3) for _ in range(rng.randrange(5, 30))] for _ in range(6)]
    index = SuffixIndex(max_match=4)
    for d, toks in enumerate(docs):
        index.extend(d, toks)
    for gone in range(1, 6):
        index.evict_oldest()
        left = [toks if d >= gone else [] for d, toks in enumerate(docs)]
        for _ in range(20):
            context = [rng.randrange(3) for _ in range(rng.randrange(1, 6))]
            k, occ = index.longest_match(context, limit=10_000)
            assert (k, set(occ)) == brute_force(left, context, 4)
        assert index.tokens == sum(map(len, left))
    index.evict_oldest()
    assert index.tokens == 0 and not index.ends


def test_global_index_stays_within_its_budget():
    proposer = SuffixProposer(SuffixConfig(global_tokens=50))
    for i in range(10):
        proposer.remember(i, list(range(i, i + 17)))
        assert proposer.shared.tokens <= 50
    assert list(proposer.shared.order) == [8, 9]  # oldest evicted first (3 x 17 > 50)


def test_tree_respects_node_budget_and_min_probability():
    rng = random.Random(3)
    conts = [[rng.randrange(3) for _ in range(6)] for _ in range(40)]
    for budget, floor in [(1, 0.01), (5, 0.01), (30, 0.2), (100, 0.05)]:
        tree, expected = grow_tree(9, conts, budget, floor)
        assert tree.size - 1 <= budget
        assert tree.tokens[0] == 9
        shares = []
        for i in range(1, tree.size):
            path, node = [], i
            while node > 0:
                path.append(tree.tokens[node])
                node = tree.parents[node]
            share = sum(c[: len(path)] == path[::-1] for c in conts) / len(conts)
            assert share >= floor
            assert tree.confidence[i] == pytest.approx(
                share / (sum(c[: len(path) - 1] == path[:0:-1] for c in conts) / len(conts)))
            shares.append(share)
        assert expected == pytest.approx(sum(shares))  # what the tree promises: its nodes' shares
    assert grow_tree(9, [], 10, 0.1)[0].size == 1


def test_a_longer_match_in_earlier_outputs_does_not_crowd_out_the_requests_own_repetition():
    """The global index matches 3 tokens, each time followed by something else (no node reaches the
    minimum share); the request's own text matches 2 and repeats: its own tree is proposed."""
    proposer = SuffixProposer(SuffixConfig(global_tokens=1000, max_nodes=8, min_probability=0.1, depth_per_match=2.0))
    for i in range(16):
        proposer.remember(100 + i, [9, 5, 6, 200 + i])
    seq = Sequence(0, [5, 6, 7, 8, 9, 5, 6], SamplingParams(), frozenset(), make_generator(0))
    assert proposer.propose([seq]).tree(0).tokens.tolist() == [6, 7, 8, 9, 5]  # 2 matched: depth 4
    proposer.remember(200, [9, 5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7, 8, 9])  # now earlier outputs promise more than the request
    assert proposer.propose([seq]).tree(0).size > 5


def test_own_repeated_text_is_proposed_from_the_first_repetition():
    text = [11, 12, 13, 14, 15, 16]
    proposer = SuffixProposer(SuffixConfig(max_nodes=8, min_probability=0.1, depth_per_match=2.0))
    seq = Sequence(0, text + [20], SamplingParams(), frozenset(), make_generator(0))
    assert proposer.propose([seq]).tree(0).size == 1  # 20 was never followed by anything
    seq.output = [11]  # the repetition starts: the rest of the text is proposed as a chain
    tree = proposer.propose([seq]).tree(0)
    assert tree.tokens.tolist() == [11, 12, 13]  # one matched token: depth 2 x 1
    seq.output = [11, 12, 13]
    assert proposer.propose([seq]).tree(0).tokens.tolist() == [13, 14, 15, 16, 20, 11, 12]  # 3 matched: depth 6


@pytest.fixture(scope="module")
def reference(models):
    engine = SpecInferEngine.from_pretrained(models["llm"], max_batch_size=8)
    return [r.token_ids for r in engine.generate(PROMPTS, PARAMS, speculate=False)]


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("proposers", [("suffix",), ("suffix", "ssm")])
@pytest.mark.parametrize("batch", [1, 8])
def test_greedy_equals_incremental(models, reference, proposers, adaptive, batch):
    tree = TreeConfig(expansion=(1, 2, 1), adaptive=adaptive, proposers=proposers,
                      suffix=SuffixConfig(global_tokens=1000))
    engine = SpecInferEngine.from_pretrained(models["llm"], [models["close"]], tree=tree, max_batch_size=batch)
    trees_pay(engine)
    for _ in range(2):  # the second time, the global index holds the first time's outputs
        results = engine.generate(PROMPTS, PARAMS)
        assert [r.token_ids for r in results] == reference
    assert engine.stats.accepted_by_proposer["suffix"] > 0
    assert ("ssm" in engine.stats.accepted_by_proposer) == ("ssm" in proposers)
    assert sum(r.accepted_draft_tokens for r in results) <= sum(engine.stats.accepted_by_proposer.values())


def test_ssm_children_outside_top_k_are_not_proposed_beside_suffix_trees(models):
    """Merged with suffix trees, a sampled request's SSM candidates are selected (its top-k per node):
    with ``top_k=1`` only one child per node has any probability, and the others are not drafted."""
    tree = TreeConfig(expansion=(3, 2), proposers=("suffix", "ssm"), suffix=SuffixConfig(max_nodes=4))
    engine = SpecInferEngine.from_pretrained(models["llm"], [models["close"]], tree=tree, max_batch_size=4)
    params = SamplingParams(max_tokens=12, temperature=0.8, top_k=1, seed=3, ignore_eos=True)
    results = engine.generate(PROMPTS[:4], params)
    assert all(len(r.token_ids) == 12 for r in results)
    assert max(engine.stats.tree_sizes) <= 1 + 2 + 4  # one SSM child per level, at most 4 suffix nodes
    assert max(engine.stats.tree_sizes) > 1
