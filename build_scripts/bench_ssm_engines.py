"""PyTorch against ONNX Runtime SSMs: per-forward latency of one tree level, and end-to-end decoding.

  .venv/bin/python build_scripts/bench_ssm_engines.py [--ssm engines/demo/ssm-a] [--repeats 200]

Per forward: the SSM's cache rows hold a prompt of --prefix tokens; one tree level of width 1 (a
chain, the served default) and 3 (the widest level of the paper's tree) is fed for batch 1 and 16,
the two engines alternating call by call (this machine is shared and noisy: medians of interleaved
runs, and the ratio). End to end: greedy speculative decoding with the demo LLM and the SSM (chain
depth 2, the served default), the two engines alternating prompt by prompt; ms per token and the
SSMs' share of it. Prints one table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from specinfer import SamplingParams, SpecInferEngine, TreeConfig
from specinfer.draft import level_batch
from specinfer.model import Transformer
from specinfer.runner import ModelRunner, chain_batch
from specinfer.runtimes.onnx_export import ensure_onnx
from specinfer.runtimes.onnxruntime_model import OnnxRuntimeModel
from specinfer.tree import TreeBuilder

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("torch", "onnxruntime")


def runners(ssm: Path, rows: int, slots: int) -> dict[str, ModelRunner]:
    model = Transformer.from_pretrained(ssm)
    graph = ensure_onnx(ssm, "float32", lambda: Transformer.from_pretrained(ssm))
    compiled = OnnxRuntimeModel(graph, model.args, torch.float32, "cpu")
    return {"torch": ModelRunner(model, rows, slots), "onnxruntime": ModelRunner(compiled, rows, slots, "sdpa")}


def per_forward(ssm: Path, prefix: int, repeats: int) -> list[tuple[int, int, float, float]]:
    """(batch, width, torch ms, onnxruntime ms): medians over interleaved calls."""
    g = torch.Generator().manual_seed(0)
    rs = runners(ssm, 16, prefix + 64)
    vocab = rs["torch"].model.args.vocab_size
    out = []
    for batch in (1, 16):
        rows = list(range(batch))
        prompts = [torch.randint(3, vocab, (prefix,), generator=g).tolist() for _ in rows]
        for r in rs.values():
            r.forward(rows, [0] * batch, chain_batch(prompts), output_index=torch.full((batch,), prefix - 1), prompt=True)
        for width in (1, 3):
            builders = [TreeBuilder(5) for _ in rows]
            levels = [[b.add(0, 7 + i) for i in range(width)] for b in builders]
            nodes = level_batch(builders, levels, width + 1)
            times: dict[str, list[float]] = {e: [] for e in ENGINES}
            for i in range(repeats + 5):
                for e in ENGINES:
                    start = time.perf_counter()
                    rs[e].forward(rows, [prefix - 1] * batch, nodes)
                    if i >= 5:  # warm-up
                        times[e].append(time.perf_counter() - start)
            out.append((batch, width, *(1e3 * statistics.median(times[e]) for e in ENGINES)))
    return out


def end_to_end(ssm: Path, prompts: int, max_tokens: int) -> dict[str, tuple[float, float, float]]:
    """Per engine: (ms per token, SSM forward ms per token, tokens per LLM step)."""
    engines = {e: SpecInferEngine.from_pretrained(ROOT / "engines/demo/llm", [ssm], tree=TreeConfig(expansion=(1, 1)),
                                                   max_batch_size=1, max_context=1024, ssm_engine=e) for e in ENGINES}
    sets = json.loads((ROOT / "engines/demo/prompts.json").read_text())
    texts = [t for pair in zip(sets["text"], sets["code"]) for t in pair]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    totals = {e: [0.0, 0.0, 0, 0] for e in ENGINES}
    outputs: dict[str, list] = {e: [] for e in ENGINES}
    for text in texts[:prompts]:
        for e, engine in engines.items():
            ssm_before = engine.ssms[0].seconds
            start = time.perf_counter()
            [r] = engine.generate([text], params)
            totals[e][0] += time.perf_counter() - start
            totals[e][1] += engine.ssms[0].seconds - ssm_before
            totals[e][2] += len(r.token_ids)
            totals[e][3] += r.llm_steps
            outputs[e].append(r.token_ids)
    assert outputs["torch"] == outputs["onnxruntime"], "the engines' greedy outputs differ"
    return {e: (1e3 * t / n, 1e3 * s / n, n / steps) for e, (t, s, n, steps) in totals.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ssm", type=Path, default=ROOT / "engines/demo/ssm-a")
    ap.add_argument("--prefix", type=int, default=128, help="committed tokens per row before the tree level")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--prompts", type=int, default=4, help="end to end: prompts (0: skip)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads of both engines (1: on a shared 2-core machine, 2 threads wait on each other)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # ONNX Runtime sessions take the same count
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, SSM {args.ssm.name}, "
          f"prefix {args.prefix}, medians of {args.repeats} interleaved calls")
    print("| batch | level width | torch ms | onnxruntime ms | torch / onnxruntime |")
    print("| --- | --- | --- | --- | --- |")
    for batch, width, t, o in per_forward(args.ssm, args.prefix, args.repeats):
        print(f"| {batch} | {width} | {t:.3f} | {o:.3f} | {t / o:.2f}x |")
    if args.prompts:
        rows = end_to_end(args.ssm, args.prompts, args.max_tokens)
        print(f"\nend to end: SmolLM2-135M + {args.ssm.name}, chain depth 2, greedy, batch 1, "
              f"{args.prompts} prompts x {args.max_tokens} tokens, engines alternating")
        print("| SSM engine | ms / token | SSM ms / token | tokens / LLM step |")
        print("| --- | --- | --- | --- |")
        for e, (ms, ssm_ms, tps) in rows.items():
            print(f"| {e} | {ms:.2f} | {ssm_ms:.2f} | {tps:.2f} |")
        print(f"speedup of onnxruntime SSMs end to end: {rows['torch'][0] / rows['onnxruntime'][0]:.3f}x")


if __name__ == "__main__":
    main()
