"""Batch-invariant linear layers of generated tokens on the CPU, bfloat16 (``rows_linear.cpp``).

Each output is one fixed chain over the input width, so a row's result does not depend on the rows
beside it, by construction (the GEMMs need padded calls of measured sizes for that: ``batch_invariance``);
and a call reads each weight row once for all its rows, so the tokens of a tree cost about what one
token costs in a decoder that is bound by streaming its weights. Generated tokens only, like
``path_attention`` (one library, ``cpu_library.py``): prompts keep the GEMMs, which pay over hundreds of rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_library import library

WIDTH_MULTIPLE = 32  # input widths the kernel takes (one vdpbf16ps chunk)
BLOCK = 4  # weight rows interleaved per packed block (rows_linear.cpp)
PACKED_FROM = 3  # rows from which the kernel reads the packed weight (1 and 2 read the row-major one)


def fits(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the kernel computes a layer of this weight (``[out, in]``) and bias: bfloat16 on the CPU,
    contiguous, input width a multiple of ``WIDTH_MULTIPLE``, a bias of one value per output. Others
    keep the GEMM form."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and weight.is_contiguous() and weight.shape[1] > 0 and weight.shape[1] % WIDTH_MULTIPLE == 0
            and (bias is None or (bias.dtype == torch.bfloat16 and bias.device.type == "cpu"
                                  and tuple(bias.shape) == weight.shape[:1])))


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight [out, in]`` as the kernel reads it from 3 rows on: ``[ceil(out / 4), in / 32, 4, 32]``,
    four rows interleaved chunk by chunk (one contiguous stream per tile of 4 outputs), rows past
    ``out`` zero. A copy, beside the row-major weight that 1 and 2 rows and prompts' GEMMs read."""
    if not fits(weight, None):
        raise ValueError(f"rows_linear: packs contiguous bfloat16 CPU weights of an input width that is a "
                         f"multiple of {WIDTH_MULTIPLE}, got a {weight.dtype} weight {tuple(weight.shape)} on {weight.device}")
    n, k = weight.shape
    padded = weight.detach() if n % BLOCK == 0 else F.pad(weight.detach(), (0, 0, 0, -n % BLOCK))
    return padded.view(-1, BLOCK, k // WIDTH_MULTIPLE, WIDTH_MULTIPLE).transpose(1, 2).contiguous()


def rows_linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` in the kernel's arithmetic, for ``x [..., in]`` bfloat16, a weight
    that ``fits`` and ``packed = pack(weight)`` (``None`` will do below ``PACKED_FROM`` rows)."""
    rows = x.numel() // max(x.shape[-1], 1)
    layout = (-(-weight.shape[0] // BLOCK), weight.shape[1] // WIDTH_MULTIPLE, BLOCK, WIDTH_MULTIPLE)
    if (x.dtype != torch.bfloat16 or x.device.type != "cpu" or not fits(weight, bias) or x.shape[-1] != weight.shape[1]
            or (packed is None and rows >= PACKED_FROM)
            or (packed is not None and (packed.dtype != torch.bfloat16 or packed.device.type != "cpu"
                                        or not packed.is_contiguous() or tuple(packed.shape) != layout))):
        raise ValueError(f"rows_linear: takes bfloat16 CPU inputs of the weight's width, a weight that ``fits`` and, "
                         f"from {PACKED_FROM} rows, ``pack``'s layout of it, got {x.dtype} inputs {tuple(x.shape)} on "
                         f"{x.device}, a {weight.dtype} weight {tuple(weight.shape)} and "
                         + ("no packed weight" if packed is None
                            else f"a {packed.dtype} packed weight {tuple(packed.shape)} on {packed.device}"))
    lib = library()
    if lib is None:  # a tensor-parallel worker whose leader loaded the kernels
        raise RuntimeError("rows_linear: this process cannot build or load the CPU kernels (see the warning "
                           "above) though the forward's form asks for them")
    n, k = weight.shape
    flat = x.reshape(-1, k).contiguous()
    b = None if bias is None else bias.contiguous()
    out = torch.empty(flat.shape[0], n, dtype=torch.bfloat16)
    if lib.rows_linear(flat.data_ptr(), weight.data_ptr(), 0 if packed is None else packed.data_ptr(),
                       0 if b is None else b.data_ptr(), out.data_ptr(), flat.shape[0], k, n):
        raise ValueError(f"rows_linear: input width {k} is not a multiple of {WIDTH_MULTIPLE}")
    return out.reshape(*x.shape[:-1], n)
