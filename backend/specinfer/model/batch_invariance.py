"""Shapes at which the CPU kernels' rounding stops depending on the batch, measured (torch 2.13, x86-64).

A token's logits and K/V must not depend on what else shares its forward (decoded alone, as one
node of a tree, as a row beside other requests), or greedy speculation stops being exact wherever
the rounding flips an argmax, which bfloat16 does often. PyTorch's CPU kernels have a few rounding
classes by shape, each bit-identical within itself (``tests/test_batch_invariance.py`` pins them):

- ``F.linear``: float32 has three classes by row count M (1, 2-3, 4 and more: MKL's gemv and two
  gemm paths; and the rows past a multiple of 4 apart); bfloat16/float16 two (1, 2 and more).
  ``padded_rows`` keeps every row in one class; in bfloat16 that costs nothing (two rows cost one).
  Other CPUs add classes by size (``row_limit`` measures where; larger calls are split).
  On CUDA (cuBLAS, H200, torch 2.11) float32 has up to 12 classes by M between 1 and 256 and moves
  them with the shape, bfloat16 has two for a 4096 x 4096 layer (none for the demo's shapes), and
  within a call of a given M every row gets the same bits wherever it sits and whatever shares the
  call (measured for 9 shapes, M of 8 to 256, both dtypes): so every call there has ``DEVICE_ROWS``.
- ``scaled_dot_product_attention`` rounds a query's result by the number of queries, its position
  among them and the key width (its flash kernel blocks keys by 512): ``attention`` below replaces it.
- A float32 GEMM of up to ``KEY_WINDOW`` keys gives the same result when keys of weight zero are
  inserted anywhere (it sums each output in one pass over the keys); past it, it blocks the keys.
- RMSNorm, rotary embedding, SiLU, embedding gathers and cache scatters are per-token already, but
  CUDA's float32 mean rounds a width-576 row by the row count (1-15 against 16+): RMSNorm there
  has ``DEVICE_ROWS`` per call too.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F

KEY_BLOCK = 64  # keys per GEMM of the weighted sum over values; key widths and cache slots are multiples of it
KEY_WINDOW = 192  # the most keys a float32 GEMM sums in one pass here: within it, zero-weight keys change nothing
MAX_TREE_TOKENS = KEY_WINDOW - KEY_BLOCK  # a tree's window: up to KEY_BLOCK - 1 committed keys, the tree, a scratch slot
ROW_PROBE = 64  # rows up to which ``row_limit`` measures a linear layer's calls
PROBE_OUTPUTS = 1 << 20  # outputs ``row_limit`` compares per row count: ~60 flips expected past a bf16 boundary
PROBE_MAX_ROWS = 4096  # its pool of rows at most (a narrow layer's calls are cheap, not free)
DEVICE_ROWS = 64  # rows of every GEMM on CUDA: smaller calls padded, larger split (bf16: 64 rows cost what 1 costs)
SPLIT_PADDING = 32  # lone roots' padding queries past which they attend apart (2-core CPU, bf16: 0.29 ms vs 0.46 at 4 rows x 8)
MIN_ROWS = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
ROW_MULTIPLE = {torch.float32: 4, torch.bfloat16: 1, torch.float16: 1}


def round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def padded_rows(rows: int, dtype: torch.dtype, device: torch.device | None = None) -> int:
    """Rows to give a GEMM of ``dtype`` so that each row lands in the same rounding class whatever
    ``rows`` is: float32's MKL rounds 1 row, 2-3 rows and the rows past a multiple of 4 differently;
    on CUDA a multiple of ``DEVICE_ROWS`` (callers split larger calls into ``DEVICE_ROWS`` pieces)."""
    if device is not None and device.type != "cpu":
        return round_up(rows, DEVICE_ROWS)
    return round_up(max(rows, MIN_ROWS.get(dtype, 1)), ROW_MULTIPLE.get(dtype, 1))


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with zero rows appended along dimension -2 up to ``rows``."""
    extra = rows - x.shape[-2]
    return x if extra == 0 else torch.cat([x, x.new_zeros(*x.shape[:-2], extra, x.shape[-1])], dim=-2)


def in_pieces(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, most: int) -> torch.Tensor:
    """``fn`` (a per-row layer) over the rows of ``x [..., K]`` in calls of at most ``most`` rows, each
    padded to ``padded_rows``: a row's result then does not depend on the rows beside it."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.cat([fn(pad_rows(p, padded_rows(len(p), x.dtype, x.device)))[: len(p)] for p in flat.split(most)])
    return out.reshape(*x.shape[:-1], out.shape[-1])


@lru_cache(maxsize=None)
def row_limit(out_features: int, in_features: int, dtype: torch.dtype) -> int:
    """The most rows one CPU ``F.linear`` call of this shape takes while giving every row the bits it
    gets alone (each call's rows padded to ``padded_rows``), measured up to ``ROW_PROBE``; the model's
    linear layers split larger calls into pieces of at most this many rows. Measured, not assumed: on
    AVX-512/AMX CPUs bfloat16 rounds differently past 32 rows and float32 past 8-12 (the boundaries
    move with the shape), which the classes above, measured on another CPU, do not know.

    A kernel that sums in another order changes a bfloat16 output only where the float32 sums round
    apart (about 6 in 100,000 outputs past 32 rows here), so each row count is tried on a pool of rows
    cut into calls of that many, about ``PROBE_OUTPUTS`` outputs per count; a count whose padded call
    rounds apart ends the limit below every count padded to that call."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=g).to(dtype)
    pool = min(max(-(-PROBE_OUTPUTS // out_features), ROW_PROBE), PROBE_MAX_ROWS)
    x = torch.randn(pool, in_features, generator=g).to(dtype)
    project = lambda p: F.linear(p, w)  # noqa: E731
    alone = in_pieces(project, x, 1)
    for n in range(2, ROW_PROBE + 1):
        calls = pool // n * n
        if not torch.equal(in_pieces(project, x[:calls], n), alone[:calls]):
            return max((m for m in range(1, n) if padded_rows(m, dtype) < padded_rows(n, dtype)), default=1)
    return ROW_PROBE


@dataclass
class VirtualKeys:
    """Each query's keys in the order incremental decoding would have them: its committed prefix, then
    its path through the tree (ancestors and itself) at the positions right after it; ``visible``
    marks the keys (virtual positions) a query sees.

    The order differs from the cache's only past a row's committed prefix, and only in rows whose
    tree is not a chain (``tree_rows``; the others, lone roots beside a tree, take the identity path),
    so the rest is read through a window of slots per such row: from the first ``KEY_BLOCK`` holding
    a tree key (``window[r, 0]``) past the tree region and the scratch slot. ``window_slots[r, t, w]``
    is the slot of virtual key ``window[r, w]`` of query ``t``; ``tail_pos[r, i, t, w]`` the virtual
    key window slot ``w`` is for query ``t`` where that key is in the row's virtual block
    ``tail_index[r, i]``, else a key the query does not see (its probability is exactly 0);
    ``r`` counts tree rows. Built on the host, where ``past`` is known without a device sync."""

    visible: torch.Tensor  # [B, T, S] bool
    tree_rows: torch.Tensor  # [R] long: the rows whose keys are not in slot order
    window: torch.Tensor  # [R, W] long (clamped to the key width)
    window_slots: torch.Tensor  # [R, T, W] long
    tail_pos: torch.Tensor  # [R, tail, T, W] long
    tail_index: torch.Tensor  # [R, tail] long: the virtual blocks that hold tree keys
    past: int = 0  # tail blocks past the key width's last (a short row beside a long one): room to make
    shaped: dict = field(default_factory=dict, repr=False, compare=False)  # ``expanded``'s, by shape

    @property
    def identity(self) -> bool:
        """Every query's keys are already in that order (chunks, chains, incremental decoding)."""
        return self.tree_rows.numel() == 0

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
        slots = torch.where(on_path, lengths[:, None, None] + node, j)  # the slot of each virtual key
        visible = (rel < 0) | on_path
        padding = count == 0  # a padding query sees only the scratch slot past the region, as with SDPA
        visible = torch.where(padding, rel == n, visible)
        rows = (slots != j).flatten(1).any(dim=1).nonzero().flatten()
        if rows.numel() == 0:
            none = torch.zeros(0, t, 0, dtype=torch.long)
            return cls(visible, rows, none[:, 0], none, none[:, None], none[:, 0])
        everyone = visible
        lengths, slots, visible, padding, count = lengths[rows], slots[rows], visible[rows], padding[rows], count[rows]
        r = len(rows)
        start = lengths // KEY_BLOCK * KEY_BLOCK
        w = int((lengths - start).max()) + n + 1  # through the scratch slot padding sees
        if w > KEY_WINDOW:
            raise ValueError(f"a tree of {n} tokens needs a key window of {w} slots; the batch-invariant "
                             f"attention sums at most {KEY_WINDOW} keys in one product (trees up to "
                             f"{MAX_TREE_TOKENS} tokens)")
        span = start[:, None] + torch.arange(w)  # [R, W] the window's slots, some past the key width
        window = span.clamp(max=width - 1)
        virtual = torch.full((r, t, width + 1), -1)  # by slot: the virtual key that reads it; a dump column
        virtual.scatter_(-1, torch.where(visible, slots, width), j.expand(r, t, width))
        pos = torch.gather(virtual, -1, window[:, None, :].expand(r, t, w)).masked_fill_((span >= width)[:, None], -1)
        first = start // KEY_BLOCK  # [R] the row's first block with tree keys
        block = torch.where(pos >= 0, pos // KEY_BLOCK - first[:, None, None], -1)
        last = torch.where(padding[..., 0], lengths[:, None] + n, lengths[:, None] + count[..., 0] - 1)  # the last key seen
        tail = int((last // KEY_BLOCK - first[:, None]).max()) + 1
        own = block[:, None] == torch.arange(tail)[None, :, None, None]  # [R, tail, T, W]
        unseen = torch.where(padding[..., 0], 0, width - 1)  # [R, T]: padding sees only slot length + n < width
        tail_pos = torch.where(own, pos[:, None], unseen[:, None, :, None])
        window_slots = torch.gather(slots, -1, window[:, None, :].expand(r, t, w))
        tail_index = first[:, None] + torch.arange(tail)
        past = max(0, int(tail_index.max()) + 1 - width // KEY_BLOCK)
        return cls(everyone, rows, window, window_slots, tail_pos, tail_index, past)

    def expanded(self, kvh: int, g: int, d: int) -> tuple[torch.Tensor, ...]:
        """The window's indices expanded to ``attention``'s shapes (``kvh`` KV heads of ``g`` queries,
        head width ``d``): made at a forward's first layer, reused by the others."""
        if (kvh, g, d) not in self.shaped:
            (r, w), t, tail = self.window.shape, self.window_slots.shape[1], self.tail_index.shape[-1]
            self.shaped[kvh, g, d] = (
                self.window_slots[:, None, :, None, :].expand(r, kvh, t, g, w),  # scores: from
                self.window[:, None, None, None, :].expand(r, kvh, t, g, w),  # scores: to
                self.tail_pos[:, None, :, :, None, :].expand(r, kvh, tail, t, g, w),  # weights
                self.window[:, None, :, None].expand(r, kvh, w, d),  # values
                self.tail_index[:, None, :, None, None, None].expand(r, kvh, tail, t, g, d))  # blocks
        return self.shaped[kvh, g, d]

    def to(self, device: torch.device) -> "VirtualKeys":
        return VirtualKeys(self.visible.to(device), self.tree_rows.to(device), self.window.to(device),
                           self.window_slots.to(device), self.tail_pos.to(device), self.tail_index.to(device), self.past)


@dataclass
class SplitKeys:
    """A batch in which only some rows verify more than their root: every row's root attends as a
    one-query row (``roots``), the other queries of the rows ``rows`` apart (``rest``), so the lone
    roots' padding to the widest tree costs no attention. A query's result does not depend on the
    queries beside it, so the split changes no bit."""

    roots: VirtualKeys
    rows: torch.Tensor  # [R] long
    rest: VirtualKeys

    @classmethod
    def build(cls, lengths: torch.Tensor, region: torch.Tensor, width: int) -> "VirtualKeys | SplitKeys":
        """``VirtualKeys.build``'s arguments; a plain ``VirtualKeys`` where the lone roots' padding
        is at most ``SPLIT_PADDING`` queries (a second call costs more than attending it; none where
        every row or none has more than a root)."""
        rows = (region.any(dim=-1).sum(dim=1) > 1).nonzero().flatten()
        b, t, _ = region.shape
        if (b - len(rows)) * (t - 1) <= SPLIT_PADDING or len(rows) == 0:
            return VirtualKeys.build(lengths, region, width)
        return cls(VirtualKeys.build(lengths, region[:, :1], width), rows,
                   VirtualKeys.build(lengths[rows], region[rows, 1:], width))

    def to(self, device: torch.device) -> "SplitKeys":
        return SplitKeys(self.roots.to(device), self.rows.to(device), self.rest.to(device))


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, view: VirtualKeys | SplitKeys) -> torch.Tensor:
    """Attention whose result for a query depends only on its own keys, in incremental decoding's order.

    ``q [B, T, H, D]``, ``keys``/``values [B, S, KVH, D]`` (``S`` a multiple of ``KEY_BLOCK``). Scores
    are one GEMM per (row, KV head), rows padded to ``padded_rows``, then put in each query's virtual
    key order (``VirtualKeys``: only the window past the committed keys moves); softmax in float32 over
    all ``S`` keys (masked keys add exact zeros); the weighted sum over keys one float32 GEMM per
    ``KEY_BLOCK`` virtual keys, summed in key order. A block holding only committed keys is the same
    for every query of a row (one GEMM for all of them). A block with tree keys is one GEMM over the
    row's window of slots with the query's weights at the slots of that block's keys and zeros
    elsewhere: a float32 GEMM of at most ``KEY_WINDOW`` keys adds zero-weight keys exactly, so this
    equals incremental decoding's block, without copying values per query; a row's blocks with tree
    keys are one GEMM, a set of rows per block (rows padded to ``padded_rows`` stay in one rounding
    class). So neither the number of queries, nor the tree's layout, nor the longest row of the batch
    changes any query's arithmetic.
    A ``SplitKeys`` view attends its roots and the rest apart (padding queries of lone roots: zeros).
    """
    if isinstance(view, SplitKeys):
        out = q.new_zeros(q.shape)
        out[:, :1] = attention(q[:, :1], keys, values, view.roots)
        out[view.rows, 1:] = attention(q[view.rows, 1:], keys[view.rows], values[view.rows], view.rest)
        return out
    b, t, h, d = q.shape
    kvh, s = keys.shape[2], keys.shape[1]
    g = h // kvh
    qg = q.view(b, t, kvh, g, d).permute(0, 2, 1, 3, 4).reshape(b, kvh, t * g, d)
    scores = torch.matmul(pad_rows(qg, padded_rows(t * g, q.dtype)), keys.permute(0, 2, 3, 1))[:, :, : t * g]
    scores = scores.float().mul_(d ** -0.5).view(b, kvh, t, g, s)
    rows, (r, w) = view.tree_rows, view.window.shape
    every = r == b  # every row verifies a tree (a lone request, a split's rest): no row indexing
    if r:
        from_slots, to_slots, weights_at, values_at, blocks_at = view.expanded(kvh, g, d)
        mine = scores if every else scores[rows]
        mine.scatter_(-1, to_slots, torch.gather(mine, -1, from_slots))
        if not every:
            scores[rows] = mine
    probs = torch.softmax(scores.masked_fill_(~view.visible[:, None, :, None, :], float("-inf")), dim=-1)
    probs = probs.nan_to_num_(0.0)  # rows that see nothing (padding)
    blocks = s // KEY_BLOCK
    vals = values.permute(0, 2, 1, 3).to(torch.float32, memory_format=torch.contiguous_format)  # [B, KVH, S, D]
    parts = block_products(probs.view(b, kvh, t * g, blocks, KEY_BLOCK).transpose(2, 3),
                           vals.view(b, kvh, blocks, KEY_BLOCK, d)).view(b, kvh, blocks, t, g, d)
    if r:
        tail = view.tail_index.shape[-1]
        mine = (probs if every else probs[rows])[:, :, None].expand(r, kvh, tail, t, g, s)
        p = torch.gather(mine, -1, weights_at).view(r, kvh, tail * t * g, w)  # a GEMM's rows: each tail block's
        v = torch.gather(vals if every else vals[rows], 2, values_at)  # weights, zeros elsewhere
        tail_parts = block_products(p, v).view(r, kvh, tail, t, g, d)
        if view.past:
            parts = torch.cat([parts, parts.new_zeros(b, kvh, view.past, t, g, d)], dim=2)
        if every:
            parts.scatter_(2, blocks_at, tail_parts)
        else:
            parts[rows] = parts[rows].scatter_(2, blocks_at, tail_parts)
    out = torch.cumsum(parts, dim=2)[:, :, -1]  # blocks summed in key order (sequentially)
    return out.permute(0, 2, 1, 3, 4).reshape(b, t, h, d).to(q.dtype)


def block_products(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``probs [..., M, BLOCK] @ values [..., BLOCK, D]`` in float32 with the rows padded to
    ``padded_rows`` (float32 GEMMs round the rows past a multiple of 4 differently)."""
    m = probs.shape[-2]
    return torch.matmul(pad_rows(probs, padded_rows(m, torch.float32)), values)[..., :m, :]
