"""Offloading (``model/offload.py``): speculative against incremental decoding when the LLM's decoder
layers are streamed from host memory for every forward, the forward-cost curve adaptive trees
calibrate in that mode (against the resident model's), and on CUDA the achieved host-to-device
bandwidth against a plain pinned copy of the same bytes, the overlap of the layers' copies with their
compute, and Hugging Face ``generate`` under accelerate's CPU offload as a peer.

  python build_scripts/bench_offload.py --json out.json   # CUDA: bfloat16, batch 1 and 16 (gpu_check.sh)
  python build_scripts/bench_offload.py --device cpu --quick   # host buffers: the same rows, small model

The model pair is ``gpu_bench.build_pair``'s (random weights, an SSM that agrees with the LLM often;
the demo checkpoints do not travel to the GPU machine). All prompts have the same length, so Hugging
Face's batch needs no padding. On CPU the "copy" runs on the calling thread before each layer: nothing
overlaps, and the figures are the host-buffer path's, not what a GPU shows.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_bench import build_pair, run  # noqa: E402

from specinfer import SpecInferEngine, TreeConfig  # noqa: E402
from specinfer.config import DTYPES, resolve_dtype  # noqa: E402
from specinfer.model import Transformer  # noqa: E402
from specinfer.runner import ModelRunner, chain_batch  # noqa: E402

PROMPT_TOKENS = 24


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` after one warm-up call: CUDA events on the current stream, else the wall clock."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start_s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start_s)
    return statistics.median(times)


def transfer(llm: Path, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    """One forward's layer copies alone, the compute alone (the resident model) and both streamed, and a
    plain copy of the same bytes from one pinned buffer (on CPU: an ordinary one), at a batch-16 verification
    shape (16 rows x 16 tokens over a 64-token prefix) and at one-token decoding."""
    resident = Transformer.from_pretrained(llm, device=str(device), dtype=dtype)
    offloaded = Transformer.from_pretrained(llm, device=str(device), dtype=dtype, offload="cpu")
    streamer = offloaded.streamer
    nbytes = sum(p.numel() * p.element_size() for layer in streamer.host for p in layer)
    src = torch.empty(nbytes, dtype=torch.uint8)
    src = src.pin_memory() if device.type == "cuda" else src
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def copy_layers() -> None:
        if device.type == "cuda":
            streamer.stream.wait_stream(torch.cuda.current_stream(device))
        for i in range(len(streamer.host)):
            streamer.load(i)
        if device.type == "cuda":
            torch.cuda.current_stream(device).wait_stream(streamer.stream)

    out = {"layer_MB_per_forward": nbytes / 1e6,
           "plain_copy_ms": 1e3 * timed(lambda: dst.copy_(src, non_blocking=True), device, repeats),
           "layer_copies_ms": 1e3 * timed(copy_layers, device, repeats)}
    g = torch.Generator().manual_seed(0)
    vocab = resident.args.vocab_size
    for name, rows, tokens in (("verify_16x16", 16, 16), ("decode_1x1", 1, 1)):
        for kind, model in (("compute", resident), ("offload", offloaded)):
            runner = ModelRunner(model, rows, 128)
            runner.forward(list(range(rows)), [0] * rows, chain_batch([torch.randint(3, vocab, (64,), generator=g).tolist()] * rows), prompt=True)
            nodes = chain_batch([torch.randint(3, vocab, (tokens,), generator=g).tolist()] * rows)
            out[f"{name}_{kind}_ms"] = 1e3 * timed(lambda: runner.forward(list(range(rows)), [64] * rows, nodes), device, repeats)
        if device.type == "cuda":  # on CPU the copies run on the calling thread, in turn with the compute
            copy, compute, both = out["layer_copies_ms"], out[f"{name}_compute_ms"], out[f"{name}_offload_ms"]
            out[f"{name}_overlap"] = (copy + compute - both) / min(copy, compute)  # 1: the shorter one fully hidden
    out["plain_copy_GB_per_s"] = nbytes / out["plain_copy_ms"] / 1e6
    out["layer_copies_GB_per_s"] = nbytes / out["layer_copies_ms"] / 1e6
    out["decode_forward_GB_per_s"] = nbytes / out["decode_1x1_offload_ms"] / 1e6
    return out


def curve(engine: SpecInferEngine) -> dict[int, float]:
    """The LLM forward costs an adaptive engine calibrated for plain decoding, ms by rows fed."""
    return {n: 1e3 * engine.llm.costs.predict(n) for n in engine.llm.costs.plain.counts}


def hf_offload(llm: Path, prompts: list[list[int]], batch: int, max_tokens: int, device: torch.device,
               dtype: torch.dtype) -> dict | None:
    """Hugging Face ``generate`` over the same LLM under accelerate's ``cpu_offload`` (None without accelerate)."""
    try:
        from accelerate import cpu_offload
    except ImportError:
        print("note: accelerate is not installed here: no Hugging Face offload peer", flush=True)
        return None
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype).eval()
    cpu_offload(model, execution_device=device)
    gen = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(torch.tensor(prompts[:batch], device=device), **{**gen, "max_new_tokens": 4, "min_new_tokens": 4})
        start = time.perf_counter()
        for i in range(0, len(prompts), batch):
            model.generate(torch.tensor(prompts[i: i + batch], device=device), **gen)
        wall = time.perf_counter() - start
    return {"tokens_per_s": len(prompts) * max_tokens / wall, "tokens_per_step": 1.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA (and CPUs that compute it), else float32")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--residual", type=float, default=0.025, help="scale of the LLM's layers after the first")
    ap.add_argument("--expansion", default="1,1,3,1,1,1")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="a small model and few tokens (the CPU run)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.layers, args.heads, args.kv_heads, args.vocab = 256, 4, 4, 2, 2048
        args.max_tokens = 16
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, args.device)
    tree = TreeConfig(expansion=tuple(int(k) for k in args.expansion.split(",")))
    adaptive = TreeConfig(expansion=tree.expansion, adaptive=True)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, args.vocab, (PROMPT_TOKENS,), generator=g).tolist() for _ in range(16)]
    rows, report = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        llm, ssm = build_pair(Path(tmp), args.hidden, args.layers, args.heads, args.kv_heads, args.vocab, args.residual)
        print(f"built the pair in {time.perf_counter() - t0:.1f} s", flush=True)
        report["transfer"] = transfer(llm, device, DTYPES[dtype], args.repeats)
        print(json.dumps(report["transfer"]), flush=True)
        common = dict(device=args.device, dtype=dtype, max_batch_size=16, max_context=256)
        resident = SpecInferEngine.from_pretrained(llm, [ssm], tree=adaptive, **common)
        report["curve_resident"] = curve(resident)
        del resident
        engines = {"speculative": SpecInferEngine.from_pretrained(llm, [ssm], tree=tree, offload="cpu", **common),
                   "adaptive": SpecInferEngine.from_pretrained(llm, [ssm], tree=adaptive, offload="cpu", **common)}
        report["curve_offload"] = curve(engines["adaptive"])
        for engine in engines.values():  # warm-up
            for batch in (1, 16):
                run(engine, prompts[:batch], batch, True, 4)
        for batch, count in ((1, 4), (16, 16)):
            for mode, engine in (("incremental", engines["speculative"]), *engines.items()):
                sizes = engine.stats.tree_sizes.copy()
                r = run(engine, prompts[:count], batch, mode != "incremental", args.max_tokens)
                verified = engine.stats.tree_sizes - sizes
                r["tree_tokens"] = sum(k * v for k, v in verified.items()) / max(1, sum(verified.values()))
                rows.append({"peer": f"offload {mode}", "batch": batch, **r})
                print(json.dumps(rows[-1]), flush=True)
            if device.type == "cuda":
                r = hf_offload(llm, prompts[:count if batch > 1 else 2], batch, args.max_tokens, device, DTYPES[dtype])
                if r is not None:
                    rows.append({"peer": "HF generate, accelerate cpu_offload", "batch": batch, **r})
                    print(json.dumps(rows[-1]), flush=True)
    print_table(args, dtype, report, rows)
    if args.json:
        args.json.write_text(json.dumps({**report, "decoding": rows}, indent=1))


def print_table(args: argparse.Namespace, dtype: str, report: dict, rows: list[dict]) -> None:
    t = report["transfer"]
    print(f"\noffload, {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'host buffers'}), "
          f"{dtype}, LLM {args.layers} layers d{args.hidden} GQA {args.heads}/{args.kv_heads} "
          f"({t['layer_MB_per_forward']:.0f} MB of layers per forward), SSM 1 layer, tree {args.expansion}, "
          f"{args.max_tokens} tokens per request, {PROMPT_TOKENS}-token prompts")
    print(f"{'peer':38} {'batch':>5} {'tok/s':>8} {'x incr.':>7} {'tok/step':>8} {'tree tok':>8}")
    for r in rows:
        base = next(x for x in rows if x["batch"] == r["batch"] and x["peer"] == "offload incremental")
        tree = f"{r['tree_tokens']:8.1f}" if "tree_tokens" in r else f"{'':8}"
        print(f"{r['peer']:38} {r['batch']:5d} {r['tokens_per_s']:8.1f} {r['tokens_per_s'] / base['tokens_per_s']:7.2f} "
              f"{r['tokens_per_step']:8.2f} {tree}")
    for name in ("resident", "offload"):
        c = report[f"curve_{name}"]
        top = max(c)
        print(f"calibrated LLM forward ms by rows fed (plain decoding), {name}: " + ", ".join(f"{n}: {ms:.2f}" for n, ms in c.items())
              + f"  (T={top} / T=1: {c[top] / c[1]:.2f}x)")
    print(f"layer copies of one forward {t['layer_copies_ms']:.2f} ms ({t['layer_copies_GB_per_s']:.1f} GB/s), plain copy of "
          f"the same bytes {t['plain_copy_ms']:.2f} ms ({t['plain_copy_GB_per_s']:.1f} GB/s): "
          f"{t['layer_copies_GB_per_s'] / t['plain_copy_GB_per_s']:.0%}; one-token decoding forward "
          f"{t['decode_1x1_offload_ms']:.2f} ms ({t['decode_forward_GB_per_s'] / t['plain_copy_GB_per_s']:.0%} of the plain copy's rate)")
    for name, label in (("verify_16x16", "16 rows x 16 tokens"), ("decode_1x1", "1 row x 1 token")):
        overlap = f": overlap {t[f'{name}_overlap']:.0%} of the shorter hidden" if f"{name}_overlap" in t else " (no overlap on CPU)"
        print(f"forward of {label}: compute alone {t[f'{name}_compute_ms']:.2f} ms, copies alone {t['layer_copies_ms']:.2f} ms, "
              f"streamed {t[f'{name}_offload_ms']:.2f} ms{overlap}")
    if not args.device.startswith("cuda"):
        print("Hugging Face generate under accelerate's cpu_offload: CUDA only (its execution device)")


if __name__ == "__main__":
    main()
