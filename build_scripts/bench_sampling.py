#!/usr/bin/env python3
"""Sampled decoding on the demo models: tokens per LLM step of the Gumbel verifier against MSS.

Per temperature, on the held-out prompts with the LLM and ``ssm-a`` (seed 0 for every request):
- selected trees, full: adaptive drafting (candidates selected by confidence) with free verification
  injected, so every step verifies the whole expansion: both verifiers see the same kind of tree;
- sampled trees: static expansion, candidates drawn from the SSM (where MSS can accept more);
- with ``--measured``: adaptive trees with the costs measured on this machine (sizes follow the load),
  and incremental Gumbel-max decoding.
Every Gumbel row must return exactly the tokens of the first one (same seed, other trees).

    .venv/bin/python build_scripts/bench_sampling.py --quick
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "build_scripts"))

from benchmark import Bench  # noqa: E402

from specinfer import SamplingParams, TreeConfig  # noqa: E402
from specinfer.cost_model import FixedCosts  # noqa: E402
from specinfer.engine import EngineStats  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="32 tokens per prompt instead of 128")
    ap.add_argument("--measured", action="store_true", help="also adaptive trees with measured costs, and incremental")
    ap.add_argument("--models", default=str(ROOT / "engines" / "demo"))
    ap.add_argument("--expansion", default="1,1,3,1")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=0, help="the first N held-out prompts (0: all 12)")
    ap.add_argument("--temperatures", default="0.7,1.0")
    args = ap.parse_args()
    bench = Bench(Path(args.models), "cpu", "float32", 32 if args.quick else 128)
    expansion = tuple(int(k) for k in args.expansion.split(","))
    bench.prompts = bench.prompts[: args.prompts or None]
    print(f"demo LLM + ssm-a, expansion {expansion}, {len(bench.prompts)} prompts x {bench.max_tokens} tokens, "
          f"batch {args.batch}, seed 0")
    for temperature in (float(t) for t in args.temperatures.split(",")):
        params = SamplingParams(max_tokens=bench.max_tokens, temperature=temperature, seed=0, ignore_eos=True)
        reference = None
        rows = [("gumbel", "selected, full"), ("mss", "selected, full"), ("gumbel", "sampled"), ("mss", "sampled")]
        if args.measured:
            rows += [("gumbel", "adaptive"), ("mss", "adaptive"), ("gumbel", "incremental")]
        for verifier, trees in rows:
            tree = TreeConfig(expansion=expansion, verifier=verifier, adaptive=trees in ("selected, full", "adaptive"))
            if trees == "selected, full":  # free verification: the whole selected tree, no calibration needed
                engine = bench.engine(("ssm-a",), replace(tree, adaptive=False), args.batch)
                engine.tree = tree
                engine.llm.costs = FixedCosts(lambda n: 1.0)
                engine.ssms[0].costs = FixedCosts(lambda n: 0.0)
            else:
                engine = bench.engine(("ssm-a",), tree, args.batch)
            engine.stats = EngineStats()
            results = engine.generate(bench.prompts, params, speculate=trees != "incremental")
            ids = [r.token_ids for r in results]
            reference = ids if reference is None else reference
            tokens, steps = sum(len(t) for t in ids), sum(r.llm_steps for r in results)
            sizes = engine.stats.tree_sizes
            mean_tree = sum(k * v for k, v in sizes.items()) / max(1, sum(sizes.values()))
            same = "n/a" if verifier == "mss" else ids == reference
            print(f"  T={temperature:<4} {verifier:<7} {trees:<15} tokens/LLM step {tokens / steps:5.3f}  "
                  f"(output tokens / LLM steps incl. prefill = {tokens}/{steps})  mean tree {mean_tree:4.2f}  "
                  f"same tokens as the first Gumbel row: {same}", flush=True)


if __name__ == "__main__":
    main()
