"""Tree attention: a ragged batch of tree nodes over each request's committed prefix and tree region.

Node ``t`` of request ``b`` sees the committed cache slots ``[0, lengths[b])`` and the region slots
``lengths[b] + j`` whose bit ``j`` is set in its TensorRT-LLM packed mask ``bits[b, t]`` (``j % 32``
of word ``j // 32``). No dense ``[B, T, S]`` mask exists: the prefix needs none and the region's
bits are read where they are tested. Prefix lengths are read on the device, so the launch depends
only on ``(B, T, region)``, not on how long the prefixes are.

One program owns a tile of ``BLOCK_M`` (node, query head) rows that share one KV head (grouped-query
heads share every K/V load), loops over the prefix and then the region in ``BLOCK_N`` slots, and keeps
an online softmax in float32. float32 inputs multiply in IEEE float32 (Triton's default, TF32, would
miss the 1e-5 agreement with SDPA); bf16/fp16 tiles go to the tensor cores as they are. A row that
sees nothing (padding over an empty prefix) writes zeros.

``invariant=True`` (the engine's batch-invariant LLM) runs ``_path_attention_kernel`` instead: one
program per (node, KV head) sums the node's keys in the order and the ``BLOCK_N`` blocks incremental
decoding would: its prefix, then the region slots it sees (its path, root first: a region lists
parents before children) at virtual positions ``length + depth``. Every key then sits in the same
column of the same block as when the path is committed and its last token decoded alone, so the
online softmax rounds alike and a node's output has incremental decoding's bits. Measured on an H200:
without it, a chain's second node differed from decoding it (bfloat16 and float32). It reads the
prefix once per node rather than once per tile of nodes.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# (BLOCK_M, BLOCK_N) per dtype: 64 rows is the smallest Hopper tensor-core (wgmma) tile for bf16/fp16;
# IEEE float32 runs on the FMA units, where 32 x 32 tiles keep compile time and shared memory low.
BLOCKS = {torch.float32: (32, 32), torch.bfloat16: (64, 64), torch.float16: (64, 64)}


@triton.jit
def _tile_update(q, k_base, v_base, slots, loaded, visible, m_i, l_i, acc, stride_s, d, d_ok,
                 scale_log2, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step over the K/V at ``slots`` (``BLOCK_N``), ``visible`` per row."""
    k = tl.load(k_base + slots[None, :] * stride_s + d[:, None], mask=loaded[None, :] & d_ok[:, None], other=0.0)
    s = tl.dot(q, k, input_precision=PRECISION) * scale_log2
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    v = tl.load(v_base + slots[:, None] * stride_s + d[None, :], mask=loaded[:, None] & d_ok[None, :], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=PRECISION)
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc


@triton.jit
def _tree_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, rows_ptr, lengths_ptr, bits_ptr,
    T, G, KVH, region, scale_log2,
    sq_b, sq_t, sq_h, sk_r, sk_s, sk_h, so_b, so_t, so_h, sm_b, sm_t,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(1) // KVH
    kvh = tl.program_id(1) % KVH
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (node, head-in-group) rows
    r_ok = r < T * G
    t = r // G
    h = kvh * G + r % G
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(q_ptr + b * sq_b + t[:, None] * sq_t + h[:, None] * sq_h + d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    row = tl.load(rows_ptr + b).to(tl.int64)
    length = tl.load(lengths_ptr + b)
    k_base = k_ptr + row * sk_r + kvh * sk_h
    v_base = v_ptr + row * sk_r + kvh * sk_h
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: a row with nothing seen yet never gives NaN
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    cols = tl.arange(0, BLOCK_N)
    for start in range(0, length, BLOCK_N):  # committed prefix: every slot below the length
        slots = start + cols
        loaded = slots < length
        visible = loaded[None, :] & r_ok[:, None]
        m_i, l_i, acc = _tile_update(q, k_base, v_base, slots, loaded, visible, m_i, l_i, acc, sk_s, d, d_ok,
                                     scale_log2, DOT_DTYPE, PRECISION)
    for start in range(0, region, BLOCK_N):  # tree region: the node's packed mask bits
        j = start + cols
        loaded = j < region
        words = tl.load(bits_ptr + b * sm_b + t[:, None] * sm_t + (j[None, :] >> 5),
                        mask=r_ok[:, None] & loaded[None, :], other=0)
        visible = ((words >> (j[None, :] & 31)) & 1) != 0
        m_i, l_i, acc = _tile_update(q, k_base, v_base, length + j, loaded, visible, m_i, l_i, acc, sk_s, d, d_ok,
                                     scale_log2, DOT_DTYPE, PRECISION)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + b * so_b + t[:, None] * so_t + h[:, None] * so_h + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])


@triton.jit
def _path_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, rows_ptr, lengths_ptr, bits_ptr,
    G, KVH, region, scale_log2,
    sq_b, sq_t, sq_h, sk_r, sk_s, sk_h, so_b, so_t, so_h, sm_b, sm_t,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    REGION_BLOCK: tl.constexpr, MATCH: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    t = tl.program_id(0)
    b = tl.program_id(1) // KVH
    kvh = tl.program_id(1) % KVH
    r = tl.arange(0, BLOCK_M)  # the group's query heads
    r_ok = r < G
    h = kvh * G + r
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(q_ptr + b * sq_b + t * sq_t + h[:, None] * sq_h + d[None, :], mask=r_ok[:, None] & d_ok[None, :],
                other=0.0)
    row = tl.load(rows_ptr + b).to(tl.int64)
    length = tl.load(lengths_ptr + b)
    k_base = k_ptr + row * sk_r + kvh * sk_h
    v_base = v_ptr + row * sk_r + kvh * sk_h
    j = tl.arange(0, REGION_BLOCK)  # region slots; the ones this node sees are its path, in order
    j_ok = j < region
    words = tl.load(bits_ptr + b * sm_b + t * sm_t + (j >> 5), mask=j_ok, other=0)
    seen = (((words >> (j & 31)) & 1) != 0) & j_ok
    rank = tl.cumsum(seen.to(tl.int32), 0) - 1  # depth of each seen slot
    n = length + tl.max(rank, 0) + 1  # virtual keys: the prefix, then the path
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    cols = tl.arange(0, BLOCK_N)
    for start in range(0, n, BLOCK_N):  # one loop body for every block: a key rounds alike wherever the prefix ends
        p = start + cols
        if MATCH and start + BLOCK_N > length:  # a block past the prefix's end: find the path's slots
            at = seen[None, :] & (rank[None, :] == (p - length)[:, None])  # [BLOCK_N, REGION_BLOCK]
            slots = tl.where(p < length, p, length + tl.sum(tl.where(at, j[None, :], 0), axis=1))
        else:  # committed slots, or chains from the region's first slot (a prompt): a position is its slot
            slots = p
        loaded = p < n
        visible = loaded[None, :] & r_ok[:, None]
        m_i, l_i, acc = _tile_update(q, k_base, v_base, slots, loaded, visible, m_i, l_i, acc, sk_s, d, d_ok,
                                     scale_log2, DOT_DTYPE, PRECISION)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + b * so_b + t * so_t + h[:, None] * so_h + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=r_ok[:, None] & d_ok[None, :])


DOT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
PATH_REGION = 256  # region slots up to which the path form finds ancestors; past it, chains only (prompts)


def tree_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor,
    lengths: torch.Tensor, bits: torch.Tensor, region: int, invariant: bool = False,
) -> torch.Tensor:
    """Attention output ``[B, T, H, D]`` of ``q [B, T, H, D]`` (rotary applied).

    ``k_cache, v_cache [R, S, KVH, D]`` (the node's own K/V already written), ``rows [B]`` their cache
    rows, ``lengths [B]`` int32 committed prefix lengths, ``bits [B, T, ceil(region/32)]`` int32
    packed region masks; the region of request ``b`` is slots ``lengths[b] + [0, region)``.
    ``invariant``: each node's result has the bits decoding its path one token at a time gives; past
    ``PATH_REGION`` region slots every node must see the region's first slots only (``PackedTreeMask``
    checks), as a prompt's tokens do, so that no ``[BLOCK_N, region]`` search runs for long prompts.
    """
    b, t, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    assert q.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous() and bits.is_contiguous()
    out = torch.empty_like(q)
    block_m, block_n = BLOCKS[q.dtype]
    common = dict(D=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)), BLOCK_N=block_n, DOT_DTYPE=DOT_DTYPES[q.dtype],
                  PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    strides = (q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
               out.stride(0), out.stride(1), out.stride(2), bits.stride(0), bits.stride(1))
    scale_log2 = math.log2(math.e) / math.sqrt(dim)
    if invariant:
        _path_attention_kernel[(t, b * kv_heads)](
            q, k_cache, v_cache, out, rows, lengths, bits, group, kv_heads, region, scale_log2, *strides,
            BLOCK_M=max(16, triton.next_power_of_2(group)), REGION_BLOCK=max(16, triton.next_power_of_2(region)),
            MATCH=region <= PATH_REGION, **common)
        return out
    grid = (triton.cdiv(t * group, block_m), b * kv_heads)
    _tree_attention_kernel[grid](q, k_cache, v_cache, out, rows, lengths, bits, t, group, kv_heads, region,
                                 scale_log2, *strides, BLOCK_M=block_m, **common)
    return out
