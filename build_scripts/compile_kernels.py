"""Compile the tree-attention kernel's two forms for a GPU without one, and print what the compiler made of them.

  .venv/bin/python build_scripts/compile_kernels.py [--arch 90] [--head-dim 128]

Triton's wheel carries ptxas, so this machine can build the kernel for Hopper (sm_90) and read the
result at no device time: compile time, shared memory per program, tensor-core instructions (wgmma
for bf16/fp16; IEEE float32 runs on FMAs), 16-byte loads and local memory (register spills). Pointers
and strides are declared divisible by 16, as Triton's launcher specializes them at run time. The tiled
form is compiled per dtype; the path form (the batch-invariant LLM's) per dtype and region block: a
tree's (with the ancestor search) and a long prompt's (without), with 3 query heads per KV head.
"""
from __future__ import annotations

import argparse
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from specinfer.kernels.tree_attention import (BLOCKS, DOT_DTYPES, PATH_REGION, _path_attention_kernel,
                                              _tree_attention_kernel)

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args()
    print(f"sm_{args.arch}, head_dim {args.head_dim}")
    print(f"{'form':5} {'dtype':5} {'block':>7} {'region':>6} {'compile s':>9} {'shared KB':>9} {'wgmma':>6} "
          f"{'fma.f32':>8} {'ld.v4':>6} {'local':>6}")
    for dtype, (block_m, block_n) in BLOCKS.items():
        forms = [("tiles", _tree_attention_kernel, block_m, {})]
        forms += [("paths", _path_attention_kernel, 16, {"REGION_BLOCK": r, "MATCH": r <= PATH_REGION})
                  for r in (16, PATH_REGION, 2048)]
        for form, fn, rows, extra in forms:
            const = {"D": args.head_dim, "BLOCK_D": max(16, triton.next_power_of_2(args.head_dim)), "BLOCK_M": rows,
                     "BLOCK_N": block_n, "DOT_DTYPE": DOT_DTYPES[dtype],
                     "PRECISION": "ieee" if dtype == torch.float32 else "tf32", **extra}
            kernel, took = compile_one(fn, dtype, const, args.arch)
            ptx = kernel.asm["ptx"]
            print(f"{form:5} {TYPES[dtype]:5} {rows:>3}x{block_n:<3} {extra.get('REGION_BLOCK', ''):>6} {took:9.1f} "
                  f"{kernel.metadata.shared / 1024:9.0f} {ptx.count('wgmma.mma_async'):6d} {ptx.count('fma.rn.f32'):8d} "
                  f"{ptx.count('ld.global.v4'):6d} {ptx.count('.local'):6d}")


def compile_one(fn, dtype: torch.dtype, const: dict, arch: int):
    """``fn`` compiled for ``sm_<arch>`` with ``const`` bound, and the seconds it took."""
    names = fn.arg_names
    pointers = {"q_ptr": TYPES[dtype], "k_ptr": TYPES[dtype], "v_ptr": TYPES[dtype], "o_ptr": TYPES[dtype],
                "rows_ptr": "i64", "lengths_ptr": "i32", "bits_ptr": "i32"}
    signature = {n: "constexpr" if n in const else "fp32" if n == "scale_log2" else
                 "*" + pointers[n] if n in pointers else "i32" for n in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
               if n in pointers or (n.startswith("s") and n[1] in "qko" and n[2] == "_")}
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(n),): v for n, v in const.items()},
                       attrs=aligned)
    start = time.perf_counter()
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32))
    return kernel, time.perf_counter() - start


if __name__ == "__main__":
    main()
