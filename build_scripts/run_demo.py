"""The main job (engine stage): make the demo models if missing, generate, print speculation figures.

Runs the SpecInfer engine in-process on engines/demo/ (LLM + two merged SSMs), greedy, and
compares with incremental decoding of the same LLM in the same run.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from specinfer import SamplingParams, SpecInferEngine, TreeConfig
from specinfer.benchmark import compare, report

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompt", default="def fibonacci(n):\n    ")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--expansion", default="1,1,3,1,1,1,1,1")
    args = ap.parse_args()
    demo = ROOT / "engines" / "demo"
    subprocess.run([sys.executable, str(ROOT / "build_scripts" / "make_demo_models.py"), "--output", str(demo)],
                   check=True)
    tree = TreeConfig(expansion=tuple(int(k) for k in args.expansion.split(",")))
    engine = SpecInferEngine.from_pretrained(demo / "llm", [demo / "ssm-a", demo / "ssm-b"], tree=tree)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    result = engine.generate([args.prompt], params)[0]
    print(f"prompt: {args.prompt!r}\ngenerated: {result.text!r}")
    print(f"tokens per LLM step: {result.tokens_per_step:.2f}  acceptance rate: {result.acceptance_rate:.1%}  "
          f"({len(result.token_ids)} tokens in {result.llm_steps} LLM steps, tree {tree.expansion}, 2 SSMs merged)")
    inc, spec, same = compare(engine, [args.prompt] * 4, params)
    print(report(inc, spec, same))


if __name__ == "__main__":
    main()
