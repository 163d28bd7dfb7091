"""Short GPU benchmark for gpu_check.sh: incremental vs speculative decoding, and the attention kernel.

The real demo checkpoints cannot travel to the GPU machine, so this builds its own pair with
``transformers.LlamaConfig`` (random weights): an LLM whose layers after the first add only a small
residual (``--residual``), and a one-layer SSM copied from the LLM's embedding, first layer, norm and
head. The SSM then agrees with the LLM often but not always, as a distilled draft model does; the
acceptance it reaches is part of the table.

Prints one table (and writes it as JSON with ``--json``): per attention backend, batch size and mode,
tokens/s, LLM forwards, tokens per forward per request, ms per step and the host (non-forward) part of
it (``triton-eager``: the kernel without CUDA graphs); then the attention kernel alone against SDPA at a verification shape, with bytes moved per call.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specinfer import SamplingParams, SpecInferEngine, TreeConfig
from specinfer.model.kv_cache import KVCache
from specinfer.runner import NodeBatch, layout
from specinfer.tree import TreeBuilder, pad_trees


def build_pair(folder: Path, hidden: int, layers: int, heads: int, kv_heads: int, vocab: int,
               residual: float) -> tuple[Path, Path]:
    """Save the LLM and its one-layer SSM under ``folder``."""
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, max_position_embeddings=2048, tie_word_embeddings=False,
                  initializer_range=0.05, bos_token_id=1, eos_token_id=2)
    llm = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **common)).eval()
    with torch.no_grad():
        for layer in llm.model.layers[1:]:
            layer.self_attn.o_proj.weight.mul_(residual)
            layer.mlp.down_proj.weight.mul_(residual)
    llm.save_pretrained(folder / "llm")
    ssm = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, **common)).eval()
    ssm.load_state_dict({k: v for k, v in llm.state_dict().items() if not k.startswith("model.layers.")
                         or k.startswith("model.layers.0.")})
    ssm.save_pretrained(folder / "ssm")
    return folder / "llm", folder / "ssm"


def run(engine: SpecInferEngine, prompts: list[list[int]], batch: int, speculate: bool, max_tokens: int) -> dict:
    """Generate every prompt, ``batch`` at a time; figures from the engine's own counters."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    s = engine.stats
    before = (s.step_seconds, s.forward_seconds, s.prefill_forwards + s.verify_forwards)
    start = time.perf_counter()
    results = []
    for i in range(0, len(prompts), batch):
        results += engine.generate(prompts[i: i + batch], params, speculate=speculate)
    wall = time.perf_counter() - start
    steps = s.prefill_forwards + s.verify_forwards - before[2]
    tokens = sum(len(r.token_ids) for r in results)
    return {
        "tokens_per_s": tokens / wall, "llm_forwards": steps,
        "tokens_per_step": sum(len(r.token_ids) for r in results) / sum(r.llm_steps for r in results),
        "ms_per_step": 1e3 * (s.step_seconds - before[0]) / steps,
        "host_ms_per_step": 1e3 * ((s.step_seconds - before[0]) - (s.forward_seconds - before[1])) / steps,
    }


def kernel_timing(dtype: torch.dtype, device: str) -> list[dict]:
    """The attention of one layer at a verification shape: 16 requests, 64-node trees over 1024 tokens."""
    from triton.testing import do_bench

    b, n, prefix, heads, kv_heads, dim = 16, 64, 1024, 32, 8, 128
    g = torch.Generator().manual_seed(0)
    trees = []
    for _ in range(b):
        tb = TreeBuilder(0)
        for i in range(1, n):
            tb.add(int(torch.randint(0, i, (1,), generator=g)), i)
        trees.append(tb.build())
    batch = pad_trees(trees)
    nodes = NodeBatch(batch.tokens, torch.arange(n).expand(b, n), batch.depths, batch.ancestors, batch.valid)
    lengths = torch.full((b,), prefix)
    cache = KVCache(1, b, prefix + n + 1, kv_heads, dim, dtype, device)
    cache.k[0].normal_()
    cache.v[0].normal_()
    q = torch.randn(b, n, heads, dim, dtype=dtype, device=device)
    rows = torch.arange(b, device=device)
    moved = 2 * b * (prefix + n) * kv_heads * dim * cache.k[0].element_size() + 2 * q.numel() * q.element_size()
    out = []
    for attention in ("sdpa", "triton"):
        _, _, vis = layout(lengths, nodes, attention)
        vis = vis.to(torch.device(device))
        ms = do_bench(lambda: vis.attend(q, cache, 0, rows), warmup=50, rep=300, return_mode="median")
        out.append({"attention": attention, "us": 1e3 * ms, "GB_per_s": moved / ms / 1e6, "MB_moved": moved / 1e6})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--residual", type=float, default=0.025, help="scale of the LLM's layers after the first")
    ap.add_argument("--expansion", default="1,1,3,1,1,1,1,1")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--attention", default="sdpa,triton-eager,triton",
                    help="backends; -eager: without CUDA graphs (on by default on CUDA, with triton)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tree = TreeConfig(expansion=tuple(int(k) for k in args.expansion.split(",")))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, args.vocab, (int(torch.randint(16, 33, (1,), generator=g)),), generator=g).tolist()
               for _ in range(16)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        llm, ssm = build_pair(Path(tmp), args.hidden, args.layers, args.heads, args.kv_heads, args.vocab, args.residual)
        print(f"built the pair in {time.perf_counter() - t0:.1f} s", flush=True)
        for attention in args.attention.split(","):
            engine = SpecInferEngine.from_pretrained(llm, [ssm], tree=tree, device=args.device, dtype=args.dtype,
                                                     max_batch_size=16, max_context=256,
                                                     attention=attention.removesuffix("-eager"),
                                                     cuda_graphs=False if attention.endswith("-eager") else None)
            for batch in (1, 16):  # warm-up: every kernel variant compiled, allocator primed
                run(engine, prompts[:batch], batch, True, 8)
                run(engine, prompts[:batch], batch, False, 8)
            for batch, count in ((1, 4), (16, 16)):
                for speculate in (False, True):
                    r = run(engine, prompts[:count], batch, speculate, args.max_tokens)
                    rows.append({"attention": attention, "batch": batch,
                                 "mode": "speculative" if speculate else "incremental", **r})
                    print(json.dumps(rows[-1]), flush=True)
    kernel = kernel_timing(getattr(torch, args.dtype), args.device) if args.device.startswith("cuda") else []
    print(f"\n{args.dtype}, LLM {args.layers} layers d{args.hidden} GQA {args.heads}/{args.kv_heads}, SSM 1 layer, "
          f"tree {args.expansion}, {args.max_tokens} tokens per request")
    print(f"{'attention':12} {'batch':>5} {'mode':11} {'tok/s':>8} {'speedup':>7} {'tok/step':>8} {'ms/step':>8} "
          f"{'host ms':>8}")
    for r in rows:
        base = next(x for x in rows if x["attention"] == r["attention"] and x["batch"] == r["batch"]
                    and x["mode"] == "incremental")
        print(f"{r['attention']:12} {r['batch']:5d} {r['mode']:11} {r['tokens_per_s']:8.1f} "
              f"{r['tokens_per_s'] / base['tokens_per_s']:7.2f} {r['tokens_per_step']:8.2f} {r['ms_per_step']:8.2f} "
              f"{r['host_ms_per_step']:8.2f}")
    if kernel:
        print("\nattention of one layer, 16 trees of 64 nodes over 1024 tokens, 32/8 heads, head_dim 128:")
        for k in kernel:
            print(f"  {k['attention']:7} {k['us']:8.1f} us  {k['GB_per_s']:7.0f} GB/s of {k['MB_moved']:.1f} MB")
    if args.json:
        args.json.write_text(json.dumps({"engine": rows, "kernel": kernel}, indent=1))


if __name__ == "__main__":
    main()
