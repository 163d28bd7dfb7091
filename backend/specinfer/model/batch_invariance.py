"""Shapes at which the CPU kernels' rounding stops depending on the batch, measured (torch 2.13, x86-64).

A token's logits and K/V must not depend on what else shares its forward (decoded alone, as one
node of a tree, as a row beside other requests), or greedy speculation stops being exact wherever
the rounding flips an argmax, which bfloat16 does often. PyTorch's CPU kernels have a few rounding
classes by shape, each bit-identical within itself (``tests/test_batch_invariance.py`` pins them):

- ``F.linear``: float32 has three classes by row count M (1, 2-3, 4 and more: MKL's gemv and two
  gemm paths; and the rows past a multiple of 4 apart); bfloat16/float16 two (1, 2 and more).
  ``padded_rows`` keeps every row in one class; in bfloat16 that costs nothing (two rows cost one).
- ``scaled_dot_product_attention`` rounds a query's result by the number of queries, its position
  among them and the key width (its flash kernel blocks keys by 512): ``attention`` below replaces it.
- RMSNorm, rotary embedding, SiLU, embedding gathers and cache scatters are per-token already.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

KEY_BLOCK = 64  # keys per GEMM of the weighted sum over values; key widths and cache slots are multiples of it
MIN_ROWS = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
ROW_MULTIPLE = {torch.float32: 4, torch.bfloat16: 1, torch.float16: 1}


def round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def padded_rows(rows: int, dtype: torch.dtype) -> int:
    """Rows to give a GEMM of ``dtype`` so that each row lands in the same rounding class whatever
    ``rows`` is: float32's MKL rounds 1 row, 2-3 rows and the rows past a multiple of 4 differently."""
    return round_up(max(rows, MIN_ROWS.get(dtype, 1)), ROW_MULTIPLE.get(dtype, 1))


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with zero rows appended along dimension -2 up to ``rows``."""
    extra = rows - x.shape[-2]
    return x if extra == 0 else torch.cat([x, x.new_zeros(*x.shape[:-2], extra, x.shape[-1])], dim=-2)


@dataclass
class VirtualKeys:
    """Each query's keys in the order incremental decoding would have them: its committed prefix, then
    its path through the tree (ancestors and itself) at the positions right after it. ``slots[b, t, j]``
    is the cache slot holding virtual key ``j`` of query ``t``; ``visible`` marks the keys it sees.
    ``identity``: every query's keys are already in that order (chunks, chains, incremental decoding)."""

    slots: torch.Tensor  # [B, T, S] long
    visible: torch.Tensor  # [B, T, S] bool
    tail_block: torch.Tensor  # [B] the first KEY_BLOCK holding a key of the tree region
    tail_blocks: int  # how many blocks from there may hold path keys
    identity: bool

    @classmethod
    def build(cls, lengths: torch.Tensor, region: torch.Tensor, width: int) -> "VirtualKeys":
        """``region [B, T, N]``: which region nodes each query sees (its path; parents come before
        children, so ascending node order is depth order)."""
        b, t, n = region.shape
        path = torch.argsort((~region).to(torch.int8), dim=-1, stable=True)  # the path's nodes first, in order
        count = region.sum(dim=-1, keepdim=True)  # [B, T, 1]
        j = torch.arange(width)
        rel = j - lengths[:, None, None]  # [B, 1, S] offset past the prefix
        on_path = (rel >= 0) & (rel < count)
        node = torch.gather(path, -1, rel.clamp(0, n - 1).expand(b, t, width))
        slots = torch.where(on_path, lengths[:, None, None] + node, j)
        visible = (rel < 0) | on_path
        padding = count == 0  # a padding query sees only the scratch slot past the region, as with SDPA
        visible = torch.where(padding, rel == n, visible)
        identity = bool(torch.equal(slots, j.expand(b, t, width)))
        tail = round_up(KEY_BLOCK - 1 + n, KEY_BLOCK) // KEY_BLOCK
        return cls(slots, visible, lengths // KEY_BLOCK, tail, identity)

    def to(self, device: torch.device) -> "VirtualKeys":
        return VirtualKeys(self.slots.to(device), self.visible.to(device), self.tail_block.to(device),
                           self.tail_blocks, self.identity)


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, view: VirtualKeys) -> torch.Tensor:
    """Attention whose result for a query depends only on its own keys, in incremental decoding's order.

    ``q [B, T, H, D]``, ``keys``/``values [B, S, KVH, D]`` (``S`` a multiple of ``KEY_BLOCK``). Scores
    are one GEMM per (row, KV head), rows padded to ``padded_rows``, then gathered into each query's
    virtual key order (``VirtualKeys``); softmax in float32 over all ``S`` keys (masked keys add exact
    zeros); the weighted sum over keys one float32 GEMM per ``KEY_BLOCK`` keys, summed in key order.
    A block holding only committed keys is the same for every query of a row (one GEMM for all of
    them); a block with tree keys gets each query's own values. So neither the number of queries, nor
    the tree's layout, nor the longest row of the batch changes any query's arithmetic.
    """
    b, t, h, d = q.shape
    kvh, s = keys.shape[2], keys.shape[1]
    g = h // kvh
    qg = q.view(b, t, kvh, g, d).permute(0, 2, 1, 3, 4).reshape(b, kvh, t * g, d)
    scores = torch.matmul(pad_rows(qg, padded_rows(t * g, q.dtype)), keys.permute(0, 2, 3, 1))[:, :, : t * g]
    scores = scores.float().mul_(d ** -0.5).view(b, kvh, t, g, s)
    if not view.identity:
        scores = torch.gather(scores, -1, view.slots[:, None, :, None, :].expand(b, kvh, t, g, s))
    probs = torch.softmax(scores.masked_fill_(~view.visible[:, None, :, None, :], float("-inf")), dim=-1)
    probs = probs.nan_to_num_(0.0)  # rows that see nothing (padding)
    blocks = s // KEY_BLOCK
    vals = values.float()
    shared = block_products(probs.view(b, kvh, t * g, blocks, KEY_BLOCK).transpose(2, 3),
                            vals.permute(0, 2, 1, 3).reshape(b, kvh, blocks, KEY_BLOCK, d))
    parts = shared.view(b, kvh, blocks, t, g, d)
    if not view.identity:
        tail = view.tail_blocks
        pos = view.tail_block[:, None] * KEY_BLOCK + torch.arange(tail * KEY_BLOCK, device=q.device)  # [B, W]
        inside = pos < s
        pos = pos.clamp(max=s - 1)
        w = pos.shape[1]
        slots = torch.gather(view.slots, -1, pos[:, None, :].expand(b, t, w))  # [B, T, W]
        own = vals[torch.arange(b, device=q.device)[:, None, None], slots]  # [B, T, W, KVH, D]
        own = own.permute(0, 3, 1, 2, 4).reshape(b, kvh, t, tail, KEY_BLOCK, d)
        p = torch.gather(probs, -1, pos[:, None, None, None, :].expand(b, kvh, t, g, w)) * inside[:, None, None, None, :]
        p = p.view(b, kvh, t, g, tail, KEY_BLOCK).permute(0, 1, 2, 4, 3, 5)  # [B, KVH, T, tail, G, BLOCK]
        tail_parts = block_products(p, own)  # [B, KVH, T, tail, G, D]
        parts = torch.cat([parts, parts.new_zeros(b, kvh, tail, t, g, d)], dim=2)
        index = (view.tail_block[:, None] + torch.arange(tail, device=q.device))  # [B, tail]
        parts.scatter_(2, index[:, None, :, None, None, None].expand(b, kvh, tail, t, g, d),
                       tail_parts.permute(0, 1, 3, 2, 4, 5))
    out = torch.cumsum(parts, dim=2)[:, :, -1]  # blocks summed in key order (sequentially)
    return out.permute(0, 2, 1, 3, 4).reshape(b, t, h, d).to(q.dtype)


def block_products(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``probs [..., M, BLOCK] @ values [..., BLOCK, D]`` in float32 with the rows padded to
    ``padded_rows`` (float32 GEMMs round the rows past a multiple of 4 differently)."""
    m = probs.shape[-2]
    return torch.matmul(pad_rows(probs, padded_rows(m, torch.float32)), values)[..., :m, :]
