"""Engine benchmark: speculative vs incremental decoding on the same prompts, in one run.

Example:
  .venv/bin/python build_scripts/bench_engine.py --llm engines/demo/llm --ssm engines/demo/ssm-a \
      --expansion 1,1,3,1,1,1,1,1 --prompts 8 --batch 1 --max-tokens 64
"""
from __future__ import annotations

import argparse
import json
import platform

import torch

from specinfer import SamplingParams, SpecInferEngine, TreeConfig
from specinfer.benchmark import compare, report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", required=True)
    ap.add_argument("--ssm", action="append", default=[])
    ap.add_argument("--expansion", default="1,1,3,1,1,1,1,1")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1, help="max concurrent requests in the engine")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    tree = TreeConfig(expansion=tuple(int(k) for k in args.expansion.split(",")))
    engine = SpecInferEngine.from_pretrained(args.llm, args.ssm, tree=tree, device=args.device, dtype=args.dtype,
                                             max_batch_size=args.batch)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, engine.vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=0, ignore_eos=True)
    inc, spec, same = compare(engine, prompts, params)
    print(f"llm={args.llm} ssms={args.ssm} expansion={tree.expansion} batch={args.batch} "
          f"prompts={args.prompts} max_tokens={args.max_tokens} temperature={args.temperature} "
          f"device={args.device} dtype={args.dtype} torch threads={torch.get_num_threads()} cpu={platform.processor() or platform.machine()}")
    print(report(inc, spec, same))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "incremental": inc.as_dict(), "speculative": spec.as_dict(),
                       "identical_output": same}, f, indent=2)


if __name__ == "__main__":
    main()
