"""The engine with its LLM sharded over the processes of an MPI job; rank 0 leads.

  mpiexec -n 2 python -m specinfer.parallel.mpi --llm DIR [--ssm DIR ...] --prompt TEXT [--prompt ...]

Rank 0 runs everything the engine runs (SSMs, trees, verification, scheduling) plus its shard of the
LLM and prints one JSON object per prompt; ranks >= 1 run the worker loop (``worker.serve``) on
their node's next device. Works across nodes where rank 0's ``--master-addr`` is reachable.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
from datetime import timedelta

from ..config import SamplingParams, TreeConfig, parse_expansion
from ..config import DTYPES
from ..engine import SpecInferEngine
from .groups import rank_device, worker_store
from .launch import MpiWorkers
from .worker import serve


def main() -> None:
    from mpi4py import MPI  # the `mpi` extra (PyPI mpich + mpi4py), or mpi4py built on the host's MPI

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", required=True)
    ap.add_argument("--ssm", action="append", default=[])
    ap.add_argument("--expansion", default="1,1,3,1,1,1,1,1")
    ap.add_argument("--prompt", action="append", default=[], help="a text prompt (the LLM's tokenizer)")
    ap.add_argument("--ids", action="append", default=[], help="a prompt as comma-separated token ids")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--incremental", action="store_true", help="decode without speculation")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: each rank takes its node-local GPU")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--master-addr", default=socket.gethostname(), help="rank 0's address, as the others reach it")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds a collective waits for another rank")
    args = ap.parse_args()
    world = MPI.COMM_WORLD
    local_rank = world.Split_type(MPI.COMM_TYPE_SHARED).rank
    device = rank_device(args.device, local_rank)  # one GPU per rank on each node
    try:
        if world.rank > 0:
            store = worker_store(world.bcast(None, root=0), world.size, timedelta(seconds=120))
            serve(store, world.rank, world.size, args.llm, device, args.dtype, timedelta(seconds=args.timeout))
        else:
            lead(args, world, str(device))
    except BaseException as exc:  # the other ranks may be blocked in MPI: end the whole job, never hang
        print(f"specinfer rank {world.rank}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        world.Abort(1)


def lead(args: argparse.Namespace, world, device: str) -> None:
    """Rank 0: the engine, with the other ranks as its tensor-parallel workers."""
    prompts = args.prompt + [[int(t) for t in ids.split(",")] for ids in args.ids]
    if not prompts:
        raise ValueError("give at least one --prompt or --ids")
    workers = MpiWorkers(world, args.master_addr, timeout=args.timeout)
    with SpecInferEngine.from_pretrained(args.llm, args.ssm, tree=TreeConfig(expansion=parse_expansion(args.expansion)),
                                         device=device, dtype=args.dtype, tensor_parallel_size=world.size,
                                         workers=workers) as engine:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
        for result in engine.generate(prompts, params, speculate=not args.incremental):
            print(json.dumps({"token_ids": result.token_ids, "text": result.text, "llm_steps": result.llm_steps}),
                  flush=True)


if __name__ == "__main__":
    main()
