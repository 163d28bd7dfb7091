"""Commands from the leader (rank 0) to the workers, broadcast over the control group (gloo, CPU).

A command is a fixed-size int64 header (the op, up to ``SCALARS`` integers, and each tensor's dtype
and shape) followed by one broadcast per tensor. Workers run no scheduling of their own: they
receive exactly the inputs the leader's own shard runs with.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from enum import IntEnum

import torch

from ..model.attention import DenseMask, PackedTreeMask, Visibility
from ..model.kv_cache import Rows

SCALARS = 6
MAX_TENSORS = 8
MAX_DIMS = 4
HEADER = 2 + SCALARS + MAX_TENSORS * (2 + MAX_DIMS)
DTYPES = [torch.int64, torch.int32, torch.bool, torch.float32]


class Op(IntEnum):
    FORWARD = 1  # the model's inputs (``forward_command``)
    MOVE = 2  # cache.move(rows, src, dst): the commit of accepted nodes
    NEW_CACHE = 3  # scalars: rows, slots
    STOP = 4


@dataclass
class Command:
    op: Op
    scalars: list[int]
    tensors: list[torch.Tensor]


def send(group, op: Op, scalars: list[int], tensors: list[torch.Tensor], timeout: timedelta) -> None:
    """Broadcast a command from rank 0 (tensors go through the CPU)."""
    header = torch.zeros(HEADER, dtype=torch.int64)
    header[0], header[1] = int(op), len(tensors)
    header[2: 2 + len(scalars)] = torch.tensor(scalars, dtype=torch.int64)
    for i, t in enumerate(tensors):
        at = 2 + SCALARS + i * (2 + MAX_DIMS)
        header[at], header[at + 1] = DTYPES.index(t.dtype), t.dim()
        header[at + 2: at + 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    group.broadcast(header, 0, timeout).wait()
    for t in tensors:
        group.broadcast(t.detach().cpu().contiguous(), 0, timeout).wait()


def receive(group, idle: timedelta, timeout: timedelta) -> Command:
    """The next command, on a worker: ``idle`` bounds the wait for its header, ``timeout`` the rest."""
    header = torch.zeros(HEADER, dtype=torch.int64)
    group.broadcast(header, 0, idle).wait()
    h = header.tolist()
    tensors = []
    for i in range(h[1]):
        at = 2 + SCALARS + i * (2 + MAX_DIMS)
        t = torch.empty(h[at + 2: at + 2 + h[at + 1]], dtype=DTYPES[h[at]])
        group.broadcast(t, 0, timeout).wait()
        tensors.append(t)
    return Command(Op(h[0]), h[2: 2 + SCALARS], tensors)


def forward_command(
    tokens: torch.Tensor, positions: torch.Tensor, rows: Rows, slots: torch.Tensor, visibility: Visibility,
    output_index: torch.Tensor | None,
) -> tuple[list[int], list[torch.Tensor]]:
    """``Transformer.forward``'s inputs (the cache aside) as scalars and tensors."""
    tensors = [tokens, positions, slots]
    if isinstance(rows, slice):
        scalars = [0, rows.start, rows.stop]
    else:
        scalars = [1, 0, 0]
        tensors.append(rows)
    if isinstance(visibility, DenseMask) and visibility.source is not None:  # batch-invariant: the workers too
        scalars += [2 if visibility.paths is None else 4, 0]
        tensors += list(visibility.source)
    elif isinstance(visibility, DenseMask):
        scalars += [0, 0]
        tensors.append(visibility.mask)
    else:
        scalars += [3 if visibility.invariant else 1, visibility.region]
        tensors += [visibility.lengths, visibility.bits]
    scalars.append(int(output_index is not None))
    if output_index is not None:
        tensors.append(output_index)
    return scalars, tensors


def forward_inputs(cmd: Command, device: torch.device) -> tuple:
    """``forward_command``'s inverse, on ``device``: ``(tokens, positions, rows, slots, visibility, output_index)``."""
    rows_kind, start, stop, vis_kind, region, has_index = cmd.scalars
    tensors = [t.to(device) for t in cmd.tensors]
    tokens, positions, slots = tensors[:3]
    rest = tensors[3:]
    rows = slice(start, stop) if rows_kind == 0 else rest.pop(0)
    if vis_kind == 0:
        visibility: Visibility = DenseMask(rest.pop(0))
    elif vis_kind in (2, 4):  # the leader's invariant keys (4: the CPU kernel's), rebuilt on the host as it built them
        lengths, region, valid = (rest.pop(0).cpu() for _ in range(3))
        visibility = DenseMask.build(lengths, region, valid, invariant=True, paths=vis_kind == 4).to(device)
    else:  # 1, or 3: the kernel's batch-invariant form
        visibility = PackedTreeMask(rest.pop(0), rest.pop(0), region, vis_kind == 3)
    output_index = rest.pop(0) if has_index else None
    return tokens, positions, rows, slots, visibility, output_index
