"""Token trees: building, merging, masks, padding, sizes."""
from __future__ import annotations

import pytest
import torch

from specinfer import TreeConfig
from specinfer.model.attention import packed_mask
from specinfer.tree import ListTree, TreeBuilder, batch_of_lists, merge, pad_trees, path_to, root_only, roots


def brute_ancestors(parents: list[int]) -> torch.Tensor:
    n = len(parents)
    anc = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            anc[i, j] = True
            j = parents[j]
    return anc


def random_parents(n: int, g: torch.Generator) -> list[int]:
    return [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]


def test_builder_collapses_duplicate_proposals():
    b = TreeBuilder(root_token=7)
    a = b.add(0, 3)
    assert b.add(0, 3) == a  # the same token under the same parent is one node
    c = b.add(a, 3)
    tree = b.build()
    assert tree.tokens.tolist() == [7, 3, 3]
    assert tree.parents.tolist() == [-1, 0, 1]
    assert tree.depths.tolist() == [0, 1, 2]
    assert tree.proposals[:, 0].tolist() == [0, 2, 1]
    assert c == 2 and tree.draft_probs is None


def test_merge_is_a_prefix_trie_union_keeping_every_proposal():
    q0, q1 = torch.tensor([0.5, 0.5, 0.0, 0.0]), torch.tensor([0.1, 0.2, 0.3, 0.4])
    a = TreeBuilder(9)
    a.set_draft_probs(0, q0)
    x = a.add(0, 1)
    a.add(x, 2)
    a.add(0, 0)
    b = TreeBuilder(9)
    b.set_draft_probs(0, q1)
    y = b.add(0, 1)
    b.add(y, 3)
    merged = merge([pad_trees([a.build()]), pad_trees([b.build()])]).tree(0)
    paths = {tuple(merged.tokens[[0] + path_to(merged.parents.tolist(), i)].tolist()) for i in range(merged.size)}
    assert paths == {(9,), (9, 1), (9, 1, 2), (9, 0), (9, 1, 3)}
    one = paths_index(merged, (9, 1))
    assert merged.proposals[one].tolist() == [1, 1]  # proposed by both SSMs
    assert merged.ssm_nodes[one].tolist() == [1, 1]
    assert merged.ssm_nodes[paths_index(merged, (9, 1, 3))].tolist() == [-1, 2]
    assert torch.equal(merged.draft_probs[0, 0], q0) and torch.equal(merged.draft_probs[1, 0], q1)
    assert all(merged.parents[i] < i for i in range(1, merged.size))


def paths_index(tree, tokens: tuple[int, ...]) -> int:
    for i in range(tree.size):
        if tuple(tree.tokens[[0] + path_to(tree.parents.tolist(), i)].tolist()) == tokens:
            return i
    raise KeyError(tokens)


def test_merge_rejects_trees_with_different_roots():
    with pytest.raises(ValueError, match="root"):
        merge([pad_trees([root_only(1)]), pad_trees([root_only(2)])])


def random_tree(size: int, vocab: int, g: torch.Generator, selected: bool = True):
    """A proposer's trie of ``size`` random insertions (duplicates collapse) under root token 0."""
    b = TreeBuilder(0, selected=selected)
    for _ in range(size):
        parent = int(torch.randint(0, len(b.tokens), (1,), generator=g))
        b.add(parent, int(torch.randint(0, vocab, (1,), generator=g)), confidence=float(torch.rand(1, generator=g)))
    return b.build()


def prefixes(tree) -> dict[tuple[int, ...], int]:
    parents = tree.parents.tolist()
    return {tuple(tree.tokens[[0] + path_to(parents, i)].tolist()): i for i in range(tree.size)}


def test_batched_merge_is_the_trie_union_of_every_request():
    """Requests of different sizes at once, three proposers with overlapping tokens (a small vocabulary):
    each merged tree holds exactly the union of the prefixes, proposals per column, the largest
    confidence, its own node ids per proposer, parents before children."""
    g = torch.Generator().manual_seed(3)
    sources = [[random_tree(int(torch.randint(0, 9, (1,), generator=g)), 3, g) for _ in range(4)] for _ in range(3)]
    merged = merge([pad_trees(trees) for trees in sources])
    for r in range(4):
        tree = merged.tree(r)
        got = prefixes(tree)
        want = [prefixes(trees[r]) for trees in sources]
        assert set(got) == set().union(*want)
        assert all(int(tree.parents[i]) < i for i in range(1, tree.size))
        for key, node in got.items():
            for col, own in enumerate(want):
                mine = own.get(key)
                src = sources[col][r]
                assert int(tree.proposals[node, col]) == (int(src.proposals[mine, 0]) if mine is not None else 0)
                assert int(tree.ssm_nodes[node, col]) == (mine if mine is not None else -1)
            conf = [float(sources[c][r].confidence[own[key]]) for c, own in enumerate(want) if key in own]
            assert float(tree.confidence[node]) == max(conf)
        assert not merged.valid[r, tree.size:].any()


def test_merging_lone_roots_adds_their_columns_only():
    """The common step where some proposers drafted nothing: the other's trees, columns widened."""
    g = torch.Generator().manual_seed(6)
    trees = [random_tree(int(torch.randint(1, 9, (1,), generator=g)), 4, g) for _ in range(3)]
    merged = merge([roots(torch.zeros(3, dtype=torch.long), 1), pad_trees(trees), roots(torch.zeros(3, dtype=torch.long), 1)])
    for r, tree in enumerate(trees):
        got = merged.tree(r)
        assert torch.equal(got.tokens, tree.tokens) and torch.equal(got.parents, tree.parents)
        assert got.proposals[:, 0].sum() == 0 and got.proposals[:, 2].sum() == 0
        assert torch.equal(got.proposals[:, 1], tree.proposals[:, 0])
        assert got.ssm_nodes[1:, 0].eq(-1).all() and got.ssm_nodes[0].tolist() == [0, 0, 0]
        assert torch.equal(got.ssm_nodes[:, 1], torch.arange(tree.size))
    with pytest.raises(ValueError, match="root"):
        merge([pad_trees(trees), roots(torch.ones(3, dtype=torch.long), 1)])


def test_merge_refuses_selected_with_sampled_candidates():
    g = torch.Generator().manual_seed(4)
    with pytest.raises(ValueError, match="selected and sampled"):
        merge([pad_trees([random_tree(3, 5, g)]), pad_trees([random_tree(3, 5, g, selected=False)])])
    lone = merge([pad_trees([random_tree(3, 5, g)]), pad_trees([root_only(0)])])  # a lone root merges with either
    assert bool(lone.selected[0])


def test_select_keeps_sub_trees_and_remaps_parents():
    first = TreeBuilder(0, selected=True)
    a, b = first.add(0, 10, confidence=0.9), first.add(0, 20, confidence=0.8)
    first.add(a, 11, confidence=0.7)
    first.add(b, 21, confidence=0.6)
    first.add(a, 12, confidence=0.5)  # node 5, under a
    second = TreeBuilder(0, selected=True)
    second.add(second.add(0, 30, confidence=0.4), 31, confidence=0.3)
    batch = pad_trees([first.build(), second.build()])
    small = batch.select(torch.tensor([[0, 1, 2, 5], [0, 1, 2, 5]]))  # row 1 has 3 nodes: index 5 is padding
    assert small.tokens.tolist() == [[0, 10, 20, 12], [0, 30, 31, 0]]
    assert small.parents.tolist() == [[-1, 0, 0, 1], [-1, 0, 1, -1]]
    assert small.depths.tolist() == [[0, 1, 1, 2], [0, 1, 2, 0]]
    assert small.sizes.tolist() == [4, 3]
    assert small.confidence[0].tolist() == pytest.approx([1.0, 0.9, 0.8, 0.5])
    assert small.ancestors[0, 3].tolist() == [True, True, False, True]
    assert torch.equal(small.ancestors[1, 3], torch.eye(4, dtype=torch.bool)[3])  # padding sees itself only


def test_lone_roots_are_incremental_decoding():
    batch = roots(torch.tensor([5, 9]), 2)
    assert batch.tokens.tolist() == [[5], [9]] and batch.sizes.tolist() == [1, 1]
    assert batch.proposals.shape == (2, 1, 2) and not batch.selected.any()


def test_ancestor_mask_matches_brute_force_batched():
    g = torch.Generator().manual_seed(0)
    parents = [random_parents(n, g) for n in (1, 5, 17, 40)]
    batch = pad_trees([tree_from_parents(p) for p in parents])
    for b, par in enumerate(parents):
        n = len(par)
        assert torch.equal(batch.ancestors[b, :n, :n], brute_ancestors(par))
        pad = batch.ancestors[b, n:]
        assert torch.equal(pad, torch.eye(batch.tokens.shape[1], dtype=torch.bool)[n:])  # padding sees itself only


def test_list_trees_stack_as_pad_trees_stacks_their_tensor_trees():
    """``batch_of_lists`` (the suffix proposer's one-shot batch) builds what stacking the same trees
    as tensors builds: tokens, parents, depths, ancestors, confidence, proposals, own ids, padding."""
    g = torch.Generator().manual_seed(4)
    tensor_trees = [random_tree(n, 7, g) for n in (0, 3, 11, 25)]
    lists = [ListTree(t.tokens.tolist(), t.parents.tolist(), t.confidence.tolist()) for t in tensor_trees]
    ours, theirs = batch_of_lists(lists, selected=True), pad_trees(tensor_trees)
    for field in ("tokens", "parents", "depths", "valid", "ancestors", "confidence", "ssm_nodes", "selected"):
        assert torch.equal(getattr(ours, field), getattr(theirs, field)), field
    assert torch.equal(ours.proposals, theirs.proposals.clamp(max=1))  # a list tree proposes each node once
    assert ours.draft_probs == [None] * 4


def tree_from_parents(parents: list[int]):
    b = TreeBuilder(0)
    for i, p in enumerate(parents[1:], start=1):
        assert b.add(p, i) == i
    return b.build()


def test_packed_mask_follows_tensorrt_llm_bit_layout():
    g = torch.Generator().manual_seed(1)
    parents = random_parents(70, g)
    anc = brute_ancestors(parents)
    packed = packed_mask(anc)
    assert packed.shape == (70, 3) and packed.dtype == torch.int32
    for i in range(70):
        for j in range(70):
            word = int(packed[i, j // 32]) & 0xFFFFFFFF
            assert bool((word >> (j % 32)) & 1) == bool(anc[i, j])


def test_expansion_sizes_and_limits():
    assert TreeConfig(expansion=(1, 1, 3, 1, 1, 1, 1, 1)).nodes_per_ssm() == 20
    assert TreeConfig(expansion=(4, 2, 2, 1)).nodes_per_ssm() == 44
    TreeConfig(expansion=(4, 2, 2, 1)).check_size(2)  # 89 tokens fit the default 128
    with pytest.raises(ValueError, match="more than max_tree_tokens=64"):
        TreeConfig(expansion=(4, 2, 2, 1), max_tree_tokens=64).check_size(2)
    with pytest.raises(ValueError, match="builds up to 341 tree tokens"):
        TreeConfig(expansion=(4, 4, 4, 4))
    with pytest.raises(ValueError, match="width at step 1 must be an integer >= 1"):
        TreeConfig(expansion=(2, 0, 1))
    with pytest.raises(ValueError, match="at least one speculation step"):
        TreeConfig(expansion=())
    with pytest.raises(ValueError, match="draft_sampling"):
        TreeConfig(draft_sampling="sometimes")
    with pytest.raises(ValueError, match="verifier"):
        TreeConfig(verifier="optimistic")


def test_expansion_text_parses_or_names_the_problem():
    from specinfer.config import parse_expansion

    assert parse_expansion("1,1,3,1") == (1, 1, 3, 1)
    with pytest.raises(ValueError, match="comma-separated integers such as 1,1,3,1, got '1,x'"):
        parse_expansion("1,x")
