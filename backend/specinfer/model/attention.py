"""What a forward's tokens see in the cache, in the form its attention backend reads.

Both forms say the same thing: node ``t`` of request ``b`` sees the committed slots
``[0, lengths[b])`` and the tree-region slots ``lengths[b] + j`` its region mask names. They are
built once per forward (``runner.layout``) and read by every layer:

- ``DenseMask`` (``attention="sdpa"``): a ``[B, T, S]`` boolean mask over the first ``S`` slots,
  for ``torch.nn.functional.scaled_dot_product_attention``; batch-invariant, each query's keys in
  incremental decoding's order instead: for ``batch_invariance.attention`` (prompts, and every token
  off the CPU or without a compiler) or for the CPU kernel ``path_attention`` (generated tokens);
- ``PackedTreeMask`` (``attention="triton"``): prefix lengths plus TensorRT-LLM's packed region bits
  (``ceil(N/32)`` int32 words per node), for the tree-attention kernel, which reads the prefix
  length on the device and never materialises a mask over the prefix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.path_attention import path_attention, path_keys
from .batch_invariance import KEY_BLOCK, SplitKeys, VirtualKeys, attention, round_up
from .kv_cache import KVCache, Rows


def packed_mask(anc: torch.Tensor) -> torch.Tensor:
    """TensorRT-LLM's packed tree mask: ``ceil(N/32)`` int32 words per row, bit ``j`` = ``anc[i, j]``."""
    n = anc.shape[-1]
    words = (n + 31) // 32
    padded = torch.zeros(*anc.shape[:-1], words * 32, dtype=torch.int64)
    padded[..., :n] = anc.long()
    bits = padded.view(*anc.shape[:-1], words, 32) << torch.arange(32, dtype=torch.int64)
    packed = bits.sum(dim=-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


@dataclass
class DenseMask:
    mask: torch.Tensor | None  # [B, T, S] bool; None in the kernel's form, which reads ``paths`` instead
    keys: VirtualKeys | SplitKeys | None = None  # batch-invariant attention (``batch_invariance.attention``) instead of SDPA
    source: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # the keys' (lengths, region, valid), on
    # the host: what tensor-parallel workers rebuild them from
    paths: tuple[torch.Tensor, ...] | None = None  # each query's keys for ``path_attention`` instead of ``keys``

    @classmethod
    def build(cls, lengths: torch.Tensor, region: torch.Tensor, valid: torch.Tensor,
              invariant: bool = False, paths: bool = False) -> "DenseMask":
        """Padding (``valid`` false) sees only the slot just past the region, which no real node uses.

        ``invariant``: the key width is a multiple of ``KEY_BLOCK``, as the batch-invariant attention
        needs; ``paths`` (with it): generated tokens on the CPU, for the ``path_attention`` kernel,
        which reads each query's keys and no mask."""
        if invariant and paths:
            return cls(None, None, (lengths, region, valid), path_keys(lengths, region, valid))
        b, t, n = region.shape
        width = round_up(int(lengths.max()) + n + 1, KEY_BLOCK if invariant else 1)
        mask = (torch.arange(width) < lengths[:, None])[:, None, :].expand(b, t, width).clone()
        cols = (lengths[:, None] + torch.arange(n))[:, None, :].expand(b, t, n)
        mask.scatter_(2, cols, region)
        mask &= valid[:, :, None]
        mask[torch.arange(b)[:, None], torch.arange(t)[None, :], (lengths + n)[:, None]] |= ~valid
        if not invariant:
            return cls(mask)
        return cls(mask, SplitKeys.build(lengths, region, width), (lengths, region, valid))

    @property
    def cpu_kernels(self) -> bool:
        """Generated tokens on the CPU: ``path_attention`` and ``rows_linear`` compute them, not the GEMMs."""
        return self.paths is not None

    def to(self, device: torch.device) -> "DenseMask":
        return DenseMask(None if self.mask is None else self.mask.to(device),
                         None if self.keys is None else self.keys.to(device), self.source,
                         self.paths)  # the kernel's keys stay on the host, where it runs

    def attend(self, q: torch.Tensor, cache: KVCache, layer: int, rows: Rows) -> torch.Tensor:
        """``[B, T, H, D]`` attention output of ``q [B, T, H, D]``."""
        if self.paths is not None:
            index = torch.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
            return path_attention(q, cache.k[layer], cache.v[layer], index, self.paths)
        keys, values = cache.read(layer, rows, self.mask.shape[-1])
        if self.keys is not None:
            return attention(q, keys, values, self.keys)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=self.mask[:, None], enable_gqa=q.shape[2] != keys.shape[2],
        )
        return out.transpose(1, 2)


@dataclass
class PackedTreeMask:
    lengths: torch.Tensor  # [B] int32
    bits: torch.Tensor  # [B, T, ceil(N/32)] int32, bit j: sees region slot j
    region: int  # N
    invariant: bool = False  # the kernel's form that gives a node its path's incremental-decoding bits

    @classmethod
    def build(cls, lengths: torch.Tensor, region: torch.Tensor, valid: torch.Tensor,
              invariant: bool = False, paths: bool = False) -> "PackedTreeMask":
        """Padding sees no region slot (``region`` is false there); its output is never read. The
        kernel blocks keys from each row's own start, so it needs no padding to be batch-invariant;
        its invariant form takes regions past ``PATH_REGION`` slots only as chains (prompts).
        ``paths`` (the CPU kernel's form) does not apply."""
        del valid, paths
        from ..kernels.tree_attention import PATH_REGION  # triton is imported only where this backend is chosen

        if invariant and region.shape[-1] > PATH_REGION and not bool((region[..., 1:] <= region[..., :-1]).all()):
            raise ValueError(f"a tree region of {region.shape[-1]} slots: the batch-invariant kernel finds "
                             f"ancestors in up to {PATH_REGION} (longer regions must be chains)")
        return cls(lengths.to(torch.int32), packed_mask(region), region.shape[-1], invariant)

    cpu_kernels = False  # a device backend: the GEMMs compute every token

    def to(self, device: torch.device) -> "PackedTreeMask":
        return PackedTreeMask(self.lengths.to(device), self.bits.to(device), self.region, self.invariant)

    def attend(self, q: torch.Tensor, cache: KVCache, layer: int, rows: Rows) -> torch.Tensor:
        from ..kernels.tree_attention import tree_attention  # triton is imported only where this backend is chosen

        if isinstance(rows, slice):
            rows = torch.arange(rows.start, rows.stop, device=q.device)
        return tree_attention(q, cache.k[layer], cache.v[layer], rows, self.lengths, self.bits, self.region,
                              self.invariant)


Visibility = DenseMask | PackedTreeMask
MASKS = {"sdpa": DenseMask, "triton": PackedTreeMask}
