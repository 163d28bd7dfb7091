"""Build compiled SSM engines: the ONNX graph of each checkpoint, and with --tensorrt a TensorRT plan.

  python build_scripts/build_engines.py --ssm engines/demo/ssm-a [--ssm DIR ...] [--dtype float32]
  python build_scripts/build_engines.py --ssm DIR --dtype float16 --tensorrt --max-batch-size 16

Artefacts go beside each checkpoint, in ``<checkpoint>/compiled/<dtype>/`` (git-ignored under
engines/), where ``SpecInferEngine.from_pretrained(..., ssm_engine=...)`` looks for them; the engine
exports a missing or stale graph itself, so this script is for building ahead (servers start faster)
and for TensorRT plans, which need the GPU machine's TensorRT (unverified: see the README).
"""
from __future__ import annotations

import argparse
import time

import onnx

from specinfer.config import TreeConfig, parse_expansion
from specinfer.config import DTYPES
from specinfer.model import Transformer
from specinfer.runtimes.onnx_export import ensure_onnx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ssm", action="append", required=True, help="SSM checkpoint folder or .gguf (repeat)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the graph's weights and cache, and TensorRT's precision")
    ap.add_argument("--force", action="store_true", help="export again even where a current graph exists")
    ap.add_argument("--tensorrt", action="store_true", help="also build a TensorRT plan from the graph (GPU machine)")
    ap.add_argument("--max-batch-size", type=int, default=16, help="TensorRT profiles: concurrent requests")
    ap.add_argument("--max-context", type=int, default=2048, help="TensorRT profiles: tokens per request")
    ap.add_argument("--expansion", default="1,1,3,1,1,1,1,1", help="TensorRT profiles: the tree the engine drafts")
    ap.add_argument("--max-tree-tokens", type=int, default=128)
    args = ap.parse_args()
    for ssm in args.ssm:
        start = time.perf_counter()
        load = lambda: Transformer.from_pretrained(ssm, dtype=DTYPES[args.dtype])  # noqa: E731,B023
        graph = ensure_onnx(ssm, args.dtype, load, force=args.force)
        onnx.checker.check_model(str(graph))
        print(f"{ssm}: {graph} ({graph.stat().st_size / 2**20:.1f} MiB, checked) in {time.perf_counter() - start:.1f} s")
        if args.tensorrt:
            from specinfer.model.checkpoint import read_model_args
            from specinfer.runtimes.tensorrt_model import build_plan, engine_profiles

            tree = TreeConfig(expansion=parse_expansion(args.expansion), max_tree_tokens=args.max_tree_tokens)
            slots = args.max_context + tree.max_tree_tokens + 1
            profiles = engine_profiles(args.max_batch_size, slots, args.max_context, tree)
            start = time.perf_counter()
            plan = build_plan(graph, read_model_args(ssm), profiles, DTYPES[args.dtype])
            print(f"{ssm}: {plan} ({plan.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s")

if __name__ == "__main__":
    main()
