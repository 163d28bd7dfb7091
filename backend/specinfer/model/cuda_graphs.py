"""CUDA graphs for a step's fixed-shape forwards (SSM tree levels and catch-up chunks, LLM verification).

A forward's launch sequence under the tree-attention kernel (``attention="triton"``) depends only on
the batch size, the fed tokens and the tree region (prefix lengths are read on the device), so
``GraphedModel`` pads each forward to a bucketed batch and token count, and replays a graph captured
for that shape the first time it is seen. Padded rows point at a spare cache row (``new_cache`` adds
one) with an empty prefix and no region bits; padded tokens write their K/V to their row's scratch
slot (prefix + region, the slot ``runner.layout`` gives padding) and their outputs are cut away.

Falls back to the eager forward, with the same result, where a shape has no graph: a dense mask
(``attention="sdpa"``), sizes past the largest bucket, ``max_graphs`` reached, or a failed capture.
With ``capture=False`` the padded path runs eagerly: how the CPU tests check the padding.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .attention import PackedTreeMask, Visibility
from .kv_cache import KVCache, Rows
from .transformer import Transformer

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
log = logging.getLogger(__name__)


def bucket(n: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest size that holds ``n``, or ``None`` past the largest."""
    return next((s for s in sizes if s >= n), None)


@dataclass
class Static:
    """One shape's input buffers, and its graph and output once captured."""

    tokens: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    rows: torch.Tensor
    lengths: torch.Tensor
    bits: torch.Tensor
    output_index: torch.Tensor | None
    graph: torch.cuda.CUDAGraph | None = None
    out: torch.Tensor | None = None


class GraphedModel:
    """``model`` behind ``ModelRunner`` (same call and cache), its fixed-shape forwards replayed as graphs."""

    def __init__(self, model: Transformer, capture: bool = True, max_graphs: int = 64) -> None:
        self.model, self.args = model, model.args
        self.capture, self.max_graphs = capture, max_graphs
        self.statics: dict[tuple, Static | None] = {}  # None: this shape failed to capture, runs eagerly
        self.pool = None
        self.spare = -1
        self.replays = 0  # forwards served by a graph (or, with capture=False, by the padded path)

    def __getattr__(self, name: str):
        """The wrapped model's attributes (weights, ``parameters()``) stay reachable, e.g. from build scripts."""
        if name == "model":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    def new_cache(self, rows: int, slots: int) -> KVCache:
        self.spare = rows  # the extra row takes padded rows' writes
        return self.model.new_cache(rows + 1, slots)

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, rows: Rows,
        slots: torch.Tensor, visibility: Visibility, output_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t = tokens.shape
        bb, tb = bucket(b, BATCH_BUCKETS), bucket(t, TOKEN_BUCKETS)
        if not isinstance(visibility, PackedTreeMask) or bb is None or tb is None:
            return self.model(tokens, positions, cache, rows, slots, visibility, output_index)
        key = (id(cache), bb, tb, visibility.region, visibility.bits.shape[-1], output_index is not None,
               visibility.invariant)
        if key not in self.statics and len(self.statics) >= self.max_graphs:
            return self.model(tokens, positions, cache, rows, slots, visibility, output_index)
        if key not in self.statics:
            self.statics[key] = self.buffers(bb, tb, visibility.bits.shape[-1], output_index is not None, tokens.device)
        static = self.statics[key]
        if static is None:
            return self.model(tokens, positions, cache, rows, slots, visibility, output_index)
        self.fill(static, tokens, positions, rows, slots, visibility, output_index)
        run = lambda: self.model(  # noqa: E731
            static.tokens, static.positions, cache, static.rows, static.slots,
            PackedTreeMask(static.lengths, static.bits, visibility.region, visibility.invariant), static.output_index)
        if not self.capture:
            static.out = run()
        elif static.graph is None:
            try:
                static.graph, static.out = self.record(run)
            except RuntimeError as exc:  # e.g. an operation that cannot be captured: this shape stays eager
                log.warning("CUDA graph capture failed for %s, running it eagerly: %s", key[1:], exc)
                self.statics[key] = None
                return self.model(tokens, positions, cache, rows, slots, visibility, output_index)
            static.graph.replay()
        else:
            static.graph.replay()
        self.replays += 1
        return (static.out[:b] if output_index is not None else static.out[:b, :t]).clone()

    def buffers(self, b: int, t: int, words: int, indexed: bool, device: torch.device) -> Static:
        long = lambda *shape: torch.zeros(shape, dtype=torch.long, device=device)  # noqa: E731
        return Static(long(b, t), long(b, t), long(b, t), long(b), torch.zeros(b, dtype=torch.int32, device=device),
                      torch.zeros(b, t, words, dtype=torch.int32, device=device), long(b) if indexed else None)

    def fill(self, s: Static, tokens: torch.Tensor, positions: torch.Tensor, rows: Rows, slots: torch.Tensor,
             visibility: PackedTreeMask, output_index: torch.Tensor | None) -> None:
        """Copy a forward's inputs into the padded buffers (device to device, no host sync)."""
        b, t = tokens.shape
        if isinstance(rows, slice):
            rows = torch.arange(rows.start, rows.stop, device=tokens.device)
        s.rows.fill_(self.spare)
        s.rows[:b] = rows
        s.lengths.zero_()
        s.lengths[:b] = visibility.lengths
        s.slots.copy_((s.lengths + visibility.region)[:, None].expand_as(s.slots))  # padding: the scratch slot
        s.slots[:b, :t] = slots
        s.tokens.zero_()
        s.tokens[:b, :t] = tokens
        s.positions.zero_()
        s.positions[:b, :t] = positions
        s.bits.zero_()
        s.bits[:b, :t] = visibility.bits
        if output_index is not None:
            s.output_index.zero_()
            s.output_index[:b] = output_index

    def record(self, run) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream (compiles the kernels), then capture ``run`` into a graph."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = run()
        return graph, out
