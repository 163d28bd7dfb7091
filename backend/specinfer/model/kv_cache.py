"""Static KV cache addressed by (row, slot): one row per running request, one slot per position.

Slots ``[0, length)`` of a row hold the request's committed tokens at their own positions; a
speculated tree's node ``i`` is written to the scratch slot ``length + i``. After verification
``commit`` moves the accepted nodes' K/V down to ``length, length + 1, ...`` so nothing accepted is
ever recomputed; the rest is simply overwritten later.

Rows are a tensor of row indices, or a ``slice`` when a batch's rows are consecutive: then reads
are views of the cache instead of copies of every row's prefix in every layer.
"""
from __future__ import annotations

import torch

Rows = torch.Tensor | slice


class KVCache:
    def __init__(
        self, num_layers: int, rows: int, slots: int, kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device | str,
    ) -> None:
        shape = (rows, slots, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slots = slots
        self.batch_index = torch.arange(rows, device=device)[:, None]

    def write(self, layer: int, rows: Rows, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v`` of shape ``[B, T, kv_heads, head_dim]`` at ``slots [B, T]`` of ``rows``."""
        if isinstance(rows, slice):
            index = self.batch_index[: k.shape[0]]
            self.k[layer][rows][index, slots] = k
            self.v[layer][rows][index, slots] = v
        else:
            self.k[layer][rows[:, None], slots] = k
            self.v[layer][rows[:, None], slots] = v

    def read(self, layer: int, rows: Rows, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``width`` slots of ``rows``: ``[B, width, kv_heads, head_dim]`` each."""
        return self.k[layer][rows, :width], self.v[layer][rows, :width]

    @staticmethod
    def rows_index(rows: list[int], device: torch.device) -> Rows:
        """A ``slice`` where ``rows`` are consecutive and ascending, else an index tensor."""
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return slice(rows[0], rows[0] + len(rows))
        return torch.tensor(rows, device=device)

    def move(self, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy slots ``src [B, L]`` to ``dst [B, L]`` in every layer (reads complete before writes)."""
        r = rows[:, None]
        for k, v in zip(self.k, self.v):
            k[r, dst] = k[r, src]
            v[r, dst] = v[r, src]
