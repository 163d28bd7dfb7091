"""A tensor-parallel worker (rank >= 1): its shard of the LLM, running exactly the leader's commands.

  python -m specinfer.parallel.worker --store HOST:PORT --rank R --size N --llm DIR [--device cuda:R]

The engine starts these itself (``SpecInferEngine.from_pretrained(..., tensor_parallel_size=N)``);
``parallel.mpi`` runs the same loop under ``mpiexec``. A worker never outlives its leader: it exits
when the leader's connection closes, and (when started by the engine) when its parent process is gone.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from datetime import timedelta

import torch

from ..config import DTYPES
from ..model import Transformer
from . import protocol
from .groups import connect, worker_store
from .layers import Collectives, Shard
from .protocol import Op

IDLE = timedelta(days=365)  # a worker waits for commands as long as its leader lives


def serve(store, rank: int, size: int, llm: str, device: torch.device, dtype: str, timeout: timedelta) -> None:
    """Load this rank's shard, join the groups, run commands until ``STOP``."""
    comm = Collectives(rank, size)
    model = Transformer.from_pretrained(llm, device=str(device), dtype=DTYPES[dtype], shard=Shard(comm))
    store.set(f"ready/{rank}", "1")
    control, comm.group = connect(store, rank, size, device, timeout)
    cache = None
    while True:
        cmd = protocol.receive(control, IDLE, timeout)
        if cmd.op == Op.STOP:
            return
        if cmd.op == Op.NEW_CACHE:
            cache = model.new_cache(cmd.scalars[0], cmd.scalars[1])
        elif cmd.op == Op.MOVE:
            cache.move(*(t.to(device) for t in cmd.tensors))
        else:
            tokens, positions, rows, slots, visibility, output_index = protocol.forward_inputs(cmd, device)
            model(tokens, positions, cache, rows, slots, visibility, output_index)


def exit_with_parent(parent: int) -> None:
    """Watchdog: end this process as soon as ``parent`` is no longer its parent (it died)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="HOST:PORT of the leader's rendezvous store")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--llm", required=True, help="the LLM checkpoint (folder or .gguf), as the leader loads it")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds a collective may wait for another rank")
    ap.add_argument("--parent", type=int, help="exit when this process (the leader) is gone")
    args = ap.parse_args()
    if args.parent is not None:
        exit_with_parent(args.parent)
    timeout = timedelta(seconds=args.timeout)
    try:
        store = worker_store(args.store, args.size, timedelta(seconds=120))
        serve(store, args.rank, args.size, args.llm, torch.device(args.device), args.dtype, timeout)
    except Exception as exc:  # the leader sees the closed connection; this says why
        print(f"specinfer worker rank {args.rank}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
