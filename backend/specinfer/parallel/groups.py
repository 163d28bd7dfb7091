"""Process groups of a tensor-parallel LLM: a control group for commands, a data group for the forward.

The control group is always gloo on the CPU (commands are small and a worker waits on it while idle,
with a long timeout); the data group carries the all-reduces and the logits' gather, on the device
(NCCL on CUDA, gloo on CPU) with the short timeout that turns a hung rank into an error.
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist


def leader_store(host: str, size: int, timeout: timedelta) -> dist.TCPStore:
    """A fresh rendezvous store on a free port (``store.port``), served by rank 0."""
    return dist.TCPStore(host, 0, size, True, timeout=timeout, wait_for_workers=False)


def worker_store(address: str, size: int, timeout: timedelta) -> dist.TCPStore:
    host, port = address.rsplit(":", 1)
    return dist.TCPStore(host, int(port), size, False, timeout=timeout)


def connect(store: dist.Store, rank: int, size: int, device: torch.device, timeout: timedelta):
    """``(control, data)`` process groups; every rank must call this with the same store."""
    control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, size, timeout)
    if device.type == "cuda":  # NCCL: written for the GPU machines, not run here (README)
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return control, dist.ProcessGroupNCCL(dist.PrefixStore("data", store), rank, size, opts)
    return control, dist.ProcessGroupGloo(dist.PrefixStore("data", store), rank, size, timeout)


def rank_device(device: str, rank: int) -> torch.device:
    """Rank ``rank``'s device when the leader runs on ``device``: the next GPUs after the leader's."""
    dev = torch.device(device)
    return dev if dev.type == "cpu" else torch.device("cuda", (dev.index or 0) + rank)
