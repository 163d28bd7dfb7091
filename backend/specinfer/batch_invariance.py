"""Shapes at which the CPU kernels' rounding stops depending on the batch, measured (torch 2.13, x86-64).

A token's logits and K/V must not depend on what else shares its forward (decoded alone, as one
node of a tree, as a row beside other requests), or greedy speculation stops being exact wherever
the rounding flips an argmax, which bfloat16 does often. PyTorch's CPU kernels have a few rounding
classes by shape, each bit-identical within itself (``tests/test_batch_invariance.py`` pins them):

- ``F.linear``: float32 has three classes by row count M (1, 2-3, 4 and more: MKL's gemv and two
  gemm paths); bfloat16/float16 two (1, 2 and more). Padding to ``MIN_ROWS`` rows keeps every
  forward in the last class. In bfloat16 that costs nothing (two rows are as fast as one).
- ``scaled_dot_product_attention``: the flash kernel splits the keys into blocks of 512 once there
  are at least 512 of them, and rounds per block; so the key width is padded to a multiple of
  ``KEY_BLOCK`` (masked keys add exact zeros). In float32/float16, fewer than 4 queries take other
  paths: the queries are padded to ``MIN_QUERIES``.
- RMSNorm, rotary embedding, SiLU, embedding gathers and cache scatters are per-token already.
"""
from __future__ import annotations

import torch

KEY_BLOCK = 512
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


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention whose result for a query depends only on that query and the keys it sees.

    ``q [B, T, H, D]``, ``keys``/``values [B, S, KVH, D]`` with ``S`` a multiple of ``KEY_BLOCK``,
    ``mask [B, T, S]``. Scores are one GEMM per (row, KV head) with the grouped queries as rows (padded
    to ``padded_rows``), softmax in float32 over all ``S`` keys (masked keys add exact zeros), and the
    weighted sum over keys one GEMM per ``KEY_BLOCK`` keys, accumulated in float32 in key order, so
    neither the number of queries nor the longest row of the batch changes any query's arithmetic.
    """
    b, t, h, d = q.shape
    kvh, s = keys.shape[2], keys.shape[1]
    g = h // kvh
    rows = padded_rows(t * g, q.dtype)
    qg = pad_rows(q.view(b, t, kvh, g, d).permute(0, 2, 1, 3, 4).reshape(b, kvh, t * g, d), rows)
    scores = torch.matmul(qg, keys.permute(0, 2, 3, 1)).float() * d ** -0.5  # [B, KVH, rows, S]
    visible = pad_rows(mask[:, None, :, None, :].expand(b, kvh, t, g, s).reshape(b, kvh, t * g, s), rows)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num_(0.0).to(values.dtype)
    out = None
    for start in range(0, s, KEY_BLOCK):
        block = values[:, start: start + KEY_BLOCK].permute(0, 2, 1, 3)  # [B, KVH, KEY_BLOCK, D]
        part = torch.matmul(probs[..., start: start + KEY_BLOCK], block).float()
        out = part if out is None else out + part
    return out[:, :, : t * g].view(b, kvh, t, g, d).permute(0, 2, 1, 3, 4).reshape(b, t, h, d).to(q.dtype)
