"""The CPU kernel for generated tokens' attention (``kernels/path_attention``): exact to float32
rounding against a float64 reference, and each tree node's output bit-identical to its path decoded
alone, whatever shares the call; the negative control (the same keys in another order) is not."""
from __future__ import annotations

import pytest
import torch

from specinfer.config import DTYPES
from specinfer.kernels.path_attention import available, path_attention, path_keys
from specinfer.runner import ModelRunner, chain_batch
from specinfer.tree import pad_trees
from test_tree_attention import random_tree

pytestmark = pytest.mark.skipif(not available(torch.float32, 64, torch.device("cpu")),
                                reason="no C++ compiler: generated tokens take the GEMM attention")


def paths_of(parents: list[int]) -> list[list[int]]:
    """Each node's path, root first."""
    out = []
    for node in range(len(parents)):
        path = [node]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        out.append(path[::-1])
    return out


def trees_in_a_cache(dtype: torch.dtype, head_dim: int, lengths: tuple[int, ...], sizes: tuple[int, ...], seed: int):
    """Random trees after prefixes of ``lengths`` in cache rows 3, 0, 2 ... (not the batch's order), 9
    query heads over 3 KV heads: the call's inputs and each node's slots in incremental order."""
    g = torch.Generator().manual_seed(seed)
    trees = [random_tree(n, g) for n in sizes]
    batch = pad_trees(trees)
    b, n = batch.tokens.shape
    lens = torch.tensor(lengths)
    region = batch.ancestors & batch.valid[:, :, None]
    rows = torch.tensor([3, 0, 2, 1][:b])
    k = torch.randn(4, 400, 3, head_dim, generator=g).to(dtype)
    v = torch.randn(4, 400, 3, head_dim, generator=g).to(dtype)
    q = torch.randn(b, n, 9, head_dim, generator=g).to(dtype)
    slots = [[list(range(lengths[r])) + [lengths[r] + i for i in path] for path in paths_of(t.parents.tolist())]
             for r, t in enumerate(trees)]
    return q, k, v, rows, path_keys(lens, region, batch.valid), slots, batch.valid


def alone(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row: int, slots: list[int]) -> torch.Tensor:
    """One query over ``slots`` of cache row ``row`` copied to the front of a fresh row: incremental
    decoding of its path, the query its last token."""
    k1, v1 = torch.zeros(1, *k.shape[1:], dtype=k.dtype), torch.zeros(1, *v.shape[1:], dtype=v.dtype)
    k1[0, : len(slots)], v1[0, : len(slots)] = k[row, slots], v[row, slots]
    last = len(slots) - 1
    keys = (torch.tensor([[last]]), torch.tensor([[1]]), torch.tensor([[[last]]]))
    return path_attention(q[None, None], k1, v1, torch.tensor([0]), keys)[0, 0]


CASES = [((300, 5, 17), (10, 3, 1)), ((0, 16, 15), (7, 12, 2)), ((64, 130), (24, 1)), ((33, 200), (7, 2))]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("head_dim", [16, 32, 64, 96, 128])
def test_tree_nodes_equal_their_paths_decoded_alone(dtype, head_dim):
    """Prefixes that end inside, at and past a 16-key block, rows beside longer and shorter ones, lone
    roots with padding: every node bit for bit its path alone; padding reads the slot past the region."""
    for seed, (lengths, sizes) in enumerate(CASES):
        q, k, v, rows, keys, slots, valid = trees_in_a_cache(DTYPES[dtype], head_dim, lengths, sizes, seed)
        out = path_attention(q, k, v, rows, keys)
        for r, nodes in enumerate(slots):
            for node, path in enumerate(nodes):
                assert torch.equal(out[r, node], alone(q[r, node], k, v, int(rows[r]), path)), \
                    f"row {r} node {node}, prefix {lengths[r]}"
            scratch = v[rows[r], lengths[r] + q.shape[1]].repeat_interleave(3, dim=0)
            assert all(torch.equal(out[r, pad], scratch) for pad in range(len(nodes), q.shape[1]) if not valid[r, pad])


def test_negative_control_the_same_keys_in_another_order_round_apart():
    """What the property rests on: a query's sums follow its keys' order. Its last two keys swapped (a
    parent and its child, as a tree's slot order can have them) change the bits of most nodes."""
    q, k, v, rows, keys, slots, _ = trees_in_a_cache(torch.float32, 64, (300,), (10,), 7)
    out = path_attention(q, k, v, rows, keys)
    deep = [(node, path) for node, path in enumerate(slots[0]) if len(path) > 301]
    differs = sum(not torch.equal(out[0, node], alone(q[0, node], k, v, int(rows[0]), path[:-2] + path[:-3:-1]))
                  for node, path in deep)
    assert len(deep) >= 5 and differs > len(deep) // 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matches_float64_attention(dtype):
    """Softmax attention to float32 rounding (bfloat16: the output's own rounding), grouped-query heads
    reading their own KV head."""
    q, k, v, rows, keys, slots, valid = trees_in_a_cache(DTYPES[dtype], 64, (300, 5, 17), (10, 3, 1), 1)
    out = path_attention(q, k, v, rows, keys)
    tolerance = 1e-5 if dtype == "float32" else 1e-2
    for r, nodes in enumerate(slots):
        for node, path in enumerate(nodes):
            kk = k[rows[r], path].double().repeat_interleave(3, dim=1)
            vv = v[rows[r], path].double().repeat_interleave(3, dim=1)
            weights = (torch.einsum("hd,shd->hs", q[r, node].double(), kk) / 8).softmax(dim=-1)
            want = torch.einsum("hs,shd->hd", weights, vv)
            assert torch.allclose(out[r, node].double(), want, atol=tolerance, rtol=tolerance)


def test_prompts_take_the_gemms_and_generated_tokens_the_kernel(models, monkeypatch):
    """The role picks the form: a prompt's chunk goes through ``batch_invariance.attention`` and the
    linear layers' GEMMs, a tree through the kernels (``path_attention``, ``rows_linear`` for every
    linear layer and the LM head), so a token's arithmetic never depends on what shares its forward."""
    from specinfer.model import Transformer, attention as dense, transformer

    calls = {"gemm": 0, "kernel": 0, "linear": 0}
    gemm, kernel, linear = dense.attention, dense.path_attention, transformer.rows_linear
    monkeypatch.setattr(dense, "attention", lambda *a: calls.__setitem__("gemm", calls["gemm"] + 1) or gemm(*a))
    monkeypatch.setattr(dense, "path_attention", lambda *a: calls.__setitem__("kernel", calls["kernel"] + 1) or kernel(*a))
    monkeypatch.setattr(transformer, "rows_linear", lambda *a: calls.__setitem__("linear", calls["linear"] + 1) or linear(*a))
    model = Transformer.from_pretrained(models["llm"], dtype=torch.bfloat16)
    runner = ModelRunner(model, 2, 256)
    assert runner.paths
    runner.forward([0, 1], [0, 0], chain_batch([[5, 6, 7], [8, 9]]), prompt=True)
    layers = len(runner.cache.k)
    assert calls == {"gemm": layers, "kernel": 0, "linear": 0}
    runner.forward([0, 1], [3, 2], chain_batch([[1, 2], [3]]))
    assert calls == {"gemm": layers, "kernel": layers, "linear": 4 * layers + 1}  # qkv, o, gate-up, down; head


def test_without_a_compiler_every_token_takes_the_gemm_form(models, monkeypatch):
    """No compiler: a warning, and runners attend through ``batch_invariance.attention`` as before; so
    with ``SPECINFER_CPU_KERNELS=0`` (silently) and with an unwritable cache (a warning); the kernels
    come back once they can be built."""
    from specinfer.kernels import cpu_library as kernel
    from specinfer.model import Transformer

    model = Transformer.from_pretrained(models["llm"], dtype=torch.bfloat16)
    monkeypatch.setattr(kernel.shutil, "which", lambda name: None)
    kernel.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
            assert kernel.library() is None
        assert not ModelRunner(model, 1, 64).paths
        monkeypatch.undo()
        monkeypatch.setenv("SPECINFER_CPU_KERNELS", "0")
        kernel.library.cache_clear()
        assert not ModelRunner(model, 1, 64).paths
        monkeypatch.setenv("SPECINFER_CPU_KERNELS", "1")
        monkeypatch.setenv("SPECINFER_CACHE", "/proc/specinfer-cannot-write-here")
        kernel.library.cache_clear()
        with pytest.warns(UserWarning, match="building the CPU kernels failed"):
            assert not ModelRunner(model, 1, 64).paths
        monkeypatch.undo()
    finally:
        kernel.library.cache_clear()
    assert ModelRunner(model, 1, 64).paths
