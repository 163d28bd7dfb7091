"""What one LLM forward costs by the number of tree tokens it verifies, per dtype, with and without
the batch-invariant padding; the curve adaptive trees calibrate at start-up; and greedy decoding at
batch 1 in float32 and bfloat16: this engine's incremental decoding, a chain of 4 (ssm-a), and
Hugging Face ``generate``, on held-out prompts.

  .venv/bin/python build_scripts/bench_forward.py [--repeats 15] [--prefix 200] [--prompts 4 --tokens 48]

Batch 1, the demo LLM, a random tree of T tokens over a prefix of --prefix tokens, the forward as the
engine runs it (``ModelRunner.forward``). Every configuration is measured in turn within each repeat
(interleaved, so drifting load hits all alike); medians after one warm-up repeat.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from specinfer import SamplingParams, SpecInferEngine, TreeConfig  # noqa: E402
from specinfer.config import DTYPES  # noqa: E402
from specinfer.model import Transformer  # noqa: E402
from specinfer.runner import ModelRunner, NodeBatch, chain_batch  # noqa: E402
from specinfer.tree import pad_trees  # noqa: E402
from test_tree_attention import random_tree  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZES = (1, 2, 4, 8, 16, 32, 64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", default=str(ROOT / "engines/demo/llm"))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--prefix", type=int, default=200)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    configs = [(d, inv) for d in ("float32", "bfloat16") for inv in (True, False)]
    models = {d: Transformer.from_pretrained(args.llm, dtype=DTYPES[d]) for d in ("float32", "bfloat16")}
    vocab = models["float32"].args.vocab_size
    prefix = torch.randint(0, vocab, (args.prefix,), generator=g).tolist()
    batches = {}
    for t in SIZES:
        tree = random_tree(t, g)
        b = pad_trees([tree])
        batches[t] = NodeBatch(b.tokens, torch.arange(t)[None], b.depths, b.ancestors, b.valid)
    runners = {}
    for d, inv in configs:
        models[d].batch_invariant(inv)
        runners[d, inv] = ModelRunner(models[d], 1, args.prefix + 128, "sdpa", batch_invariant=inv)
        runners[d, inv].forward([0], [0], chain_batch([prefix]), prompt=True)
    times: dict[tuple, list[float]] = {(c, t): [] for c in configs for t in SIZES}
    for rep in range(args.repeats + 1):
        for c in configs:
            models[c[0]].batch_invariant(c[1])
            for t in SIZES:
                start = time.perf_counter()
                runners[c].forward([0], [args.prefix], batches[t])
                if rep:
                    times[c, t].append(time.perf_counter() - start)
    print(f"ms per LLM forward, batch 1, tree of T tokens over a {args.prefix}-token prefix, "
          f"median of {args.repeats} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print("| dtype | batch-invariant | " + " | ".join(f"T={t}" for t in SIZES) + " | T=8 / T=1 | T=16 / T=1 |")
    print("| --- | --- | " + " | ".join("---" for _ in SIZES) + " | --- | --- |")
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    for c in configs:
        cells = " | ".join(f"{med[c, t]:.1f}" for t in SIZES)
        print(f"| {c[0]} | {'yes' if c[1] else 'no'} | {cells} | {med[c, 8] / med[c, 1]:.2f}x | {med[c, 16] / med[c, 1]:.2f}x |")
    for d in ("float32", "bfloat16"):
        print(f"{d}: batch-invariant / fastest, T=1: {med[(d, True), 1] / med[(d, False), 1]:.3f}x, "
              f"T=8: {med[(d, True), 8] / med[(d, False), 8]:.3f}x")
    models["bfloat16"].batch_invariant(True)
    engine = SpecInferEngine.from_pretrained(args.llm, [ROOT / "engines/demo/ssm-a"], TreeConfig(expansion=(1, 1, 3, 1), adaptive=True),
                                             dtype="bfloat16", max_batch_size=1, max_context=1024)
    costs = engine.llm.costs
    print("the curve adaptive trees calibrated at start-up (bfloat16, batch 1; ms by tokens fed): "
          + ", ".join(f"{1 + k}: {1000 * costs.predict(1 + k, rows=1):.1f}" for k in [0] + costs.extra[1, False].counts))

    decoding(args)


def decoding(args: argparse.Namespace) -> None:
    """ms per token at batch 1, greedy, each dtype: incremental, chain of 4, Hugging Face generate;
    whether the chain's tokens equal incremental decoding's."""
    from benchmark import held_out_prompts
    from transformers import AutoModelForCausalLM

    from specinfer.tokenizer import TextTokenizer

    tokenizer = TextTokenizer.from_checkpoint(args.llm)
    prompts = [tokenizer.encode(p) for p in held_out_prompts(ROOT / "engines/demo", tokenizer)][: args.prompts]
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    print(f"greedy decoding, batch 1, {len(prompts)} held-out prompts x {args.tokens} tokens (warm-up on another prompt)")
    print("| dtype | incremental ms/token | chain of 4 (ssm-a) ms/token | tokens/step | chain == incremental | HF generate ms/token |")
    print("| --- | --- | --- | --- | --- | --- |")
    warm = [tokenizer.encode("Warm-up.")]
    for dtype in ("float32", "bfloat16"):
        engine = SpecInferEngine.from_pretrained(args.llm, [ROOT / "engines/demo/ssm-a"], TreeConfig(expansion=(1, 1, 1, 1)),
                                                 dtype=dtype, max_batch_size=1, max_context=1024)
        engine.generate(warm, SamplingParams(max_tokens=8), speculate=False)
        engine.generate(warm, SamplingParams(max_tokens=8))
        start = time.perf_counter()
        plain = [engine.generate([p], params, speculate=False)[0] for p in prompts]
        inc = time.perf_counter() - start
        start = time.perf_counter()
        chain = [engine.generate([p], params)[0] for p in prompts]
        spec = time.perf_counter() - start
        hf = AutoModelForCausalLM.from_pretrained(args.llm, dtype=DTYPES[dtype]).eval()
        gen = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            hf.generate(torch.tensor(warm), **{**gen, "max_new_tokens": 8, "min_new_tokens": 8})
            start = time.perf_counter()
            for p in prompts:
                hf.generate(torch.tensor([p]), **gen)
            hf_s = time.perf_counter() - start
        n = len(prompts) * args.tokens
        steps = sum(len(r.token_ids) for r in chain) / sum(r.llm_steps for r in chain)
        same = sum(a.token_ids == b.token_ids for a, b in zip(chain, plain))
        print(f"| {dtype} | {1000 * inc / n:.1f} | {1000 * spec / n:.1f} | {steps:.2f} | {same}/{len(prompts)} | {1000 * hf_s / n:.1f} |")


if __name__ == "__main__":
    main()
