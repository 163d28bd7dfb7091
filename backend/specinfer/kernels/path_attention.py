"""Batch-invariant attention of generated tokens on the CPU (``path_attention.cpp``).

Each query sums over its own keys (its committed prefix, then its tree path, root first) in one
fixed order, so a tree node's output is bit-identical to decoding its path one token at a time,
whatever else shares the forward: what ``batch_invariance.attention`` gets from padded GEMMs, key
blocks and reordered windows, here by construction and without the tree's extra passes. Its
arithmetic is its own (not the GEMMs'), so a token must take one of the two paths by its role alone:
prompts go through ``batch_invariance.attention`` (GEMMs pay over hundreds of queries), generated
tokens through this kernel, in speculation and in incremental decoding alike.

Built with ``rows_linear.cpp`` into one library (``cpu_library.py``): where it cannot be built, every
token takes ``batch_invariance.attention``.
"""
from __future__ import annotations

import torch

from .cpu_library import library

KERNEL_DTYPES = (torch.float32, torch.bfloat16)
HEAD_DIMS = (16, 32, 48, 64, 80, 96, 112, 128)  # the head widths the kernel is built for


def available(dtype: torch.dtype, head_dim: int, device: torch.device) -> bool:
    """Whether generated tokens of a model of this dtype and head width on ``device`` use the kernel."""
    return device.type == "cpu" and dtype in KERNEL_DTYPES and head_dim in HEAD_DIMS and library() is not None


def path_keys(lengths: torch.Tensor, region: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each query's keys, for ``path_attention``: ``prefix [B, T]`` committed slots seen, ``npath
    [B, T]`` and ``path [B, T, P]`` the region slots it sees, root first (``region [B, T, N]`` lists
    parents before children). Padding (``valid`` false) sees only the slot just past the region."""
    b, t, n = region.shape
    count = region.sum(dim=-1)
    order = torch.argsort((~region).to(torch.int8), dim=-1, stable=True)[..., : max(1, int(count.max()))]
    path = lengths[:, None, None] + order
    path[..., 0] = torch.where(valid, path[..., 0], lengths[:, None] + n)
    npath = torch.where(valid, count, 1)
    prefix = torch.where(valid, lengths[:, None].expand(b, t), 0)
    return prefix.contiguous(), npath.contiguous(), path.contiguous()


def path_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                   keys: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``[B, T, H, D]`` attention of ``q [B, T, H, D]`` over cache layers ``k``/``v [R, S, KVH, D]``
    (rows ``rows [B]``), each query over ``path_keys``' keys."""
    lib = library()
    if lib is None:  # a tensor-parallel worker whose leader loaded the kernel
        raise RuntimeError("path_attention: this process cannot build or load the CPU attention kernel (see the "
                           "warning above) though the forward's form asks for it")
    prefix, npath, path = keys
    b, t, h, d = q.shape
    kvh = k.shape[2]
    qf = q.to(torch.float32).contiguous()
    out = torch.empty(b, t, h, d, dtype=torch.float32)
    failed = lib.path_attention(
        qf.data_ptr(), k.data_ptr(), v.data_ptr(), int(k.dtype == torch.bfloat16), rows.data_ptr(), prefix.data_ptr(),
        npath.data_ptr(), path.data_ptr(), out.data_ptr(), b, t, h, kvh, d, k.shape[1], path.shape[-1], d ** -0.5)
    if failed == 2:
        raise ValueError(f"path_attention: head width {d} is not one of {HEAD_DIMS}")
    if failed:
        raise MemoryError("path_attention: out of memory for its score buffers")
    return out.to(q.dtype)
