"""Batch-invariant linear layers of generated tokens on the CPU, bfloat16 (``rows_linear.cpp``).

Each output is one fixed chain over the input width, so a row's result does not depend on the rows
beside it, by construction (the GEMMs need padded calls of measured sizes for that: ``batch_invariance``);
and a call reads each weight row once for all its rows, so the tokens of a tree cost about what one
token costs in a decoder that is bound by streaming its weights. Generated tokens only, like
``path_attention`` (one library, ``cpu_library.py``): prompts keep the GEMMs, which pay over hundreds of rows.
"""
from __future__ import annotations

import torch

from .cpu_library import library

WIDTH_MULTIPLE = 32  # input widths the kernel takes (one vdpbf16ps chunk)


def fits(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the kernel computes a layer of this weight (``[out, in]``) and bias: bfloat16 on the CPU,
    contiguous, input width a multiple of ``WIDTH_MULTIPLE``, a bias of one value per output. Others keep
    the GEMM form."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.is_contiguous()
            and weight.shape[1] % WIDTH_MULTIPLE == 0
            and (bias is None or (bias.dtype == torch.bfloat16 and bias.device.type == "cpu"
                                  and tuple(bias.shape) == weight.shape[:1])))


def rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` in the kernel's arithmetic, for ``x [..., in]`` bfloat16 (``fits``)."""
    if x.dtype != torch.bfloat16 or not fits(weight, bias):
        raise ValueError(f"rows_linear: takes bfloat16 inputs and CPU layers that ``fits``, got {x.dtype} "
                         f"and a {weight.dtype} weight {tuple(weight.shape)}")
    lib = library()
    if lib is None:  # a tensor-parallel worker whose leader loaded the kernels
        raise RuntimeError("rows_linear: this process cannot build or load the CPU kernels (see the warning "
                           "above) though the forward's form asks for them")
    n, k = weight.shape
    flat = x.reshape(-1, k).contiguous()
    b = None if bias is None else bias.contiguous()
    out = torch.empty(flat.shape[0], n, dtype=torch.bfloat16)
    if lib.rows_linear(flat.data_ptr(), weight.data_ptr(), 0 if b is None else b.data_ptr(), out.data_ptr(),
                       flat.shape[0], k, n):
        raise ValueError(f"rows_linear: input width {k} is not a multiple of {WIDTH_MULTIPLE}")
    return out.reshape(*x.shape[:-1], n)
