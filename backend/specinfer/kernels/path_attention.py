"""Batch-invariant attention of generated tokens on the CPU (``path_attention.cpp``).

Each query sums over its own keys (its committed prefix, then its tree path, root first) in one
fixed order, so a tree node's output is bit-identical to decoding its path one token at a time,
whatever else shares the forward: what ``batch_invariance.attention`` gets from padded GEMMs, key
blocks and reordered windows, here by construction and without the tree's extra passes. Its
arithmetic is its own (not the GEMMs'), so a token must take one of the two paths by its role alone:
prompts go through ``batch_invariance.attention`` (GEMMs pay over hundreds of queries), generated
tokens through this kernel, in speculation and in incremental decoding alike.

Compiled with the machine's C++ compiler (GCC 12 or newer, or Clang: vector shuffles) on first use
(``-march=native``; about a second) into ``$SPECINFER_CACHE`` (default ``~/.cache/specinfer``), keyed
by the source, the flags and the CPU's feature flags. Without a compiler, or where building or loading
fails, every token takes ``batch_invariance.attention``, as before, and a warning says why;
``SPECINFER_PATH_ATTENTION=0`` does the same on purpose, silently (A/B measurements).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("path_attention.cpp")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-fopenmp", "-shared", "-fPIC"]
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
HEAD_DIMS = (16, 32, 48, 64, 80, 96, 112, 128)  # the head widths the kernel is built for


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or ``None``: disabled, or no compiler, or building or loading it failed
    (a warning says which)."""
    if os.environ.get("SPECINFER_PATH_ATTENTION", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        warnings.warn("no C++ compiler: generated tokens take the slower batch-invariant GEMM attention")
        return None
    try:
        return build(compiler)
    except (OSError, RuntimeError) as exc:  # an unwritable cache, a noexec mount, a compiler that fails
        warnings.warn(f"building {SOURCE.name} failed, generated tokens take the slower batch-invariant GEMM "
                      f"attention: {exc}")
        return None


def build(compiler: str) -> ctypes.CDLL:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *FLAGS, cpu_flags()]).encode()).hexdigest()[:16]
    folder = Path(os.environ.get("SPECINFER_CACHE", Path.home() / ".cache" / "specinfer"))
    target = folder / f"path_attention-{key}.so"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:  # another process may build the same file
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} exited with {result.returncode}:\n{result.stderr[-2000:]}")
            os.replace(built, target)
    lib = ctypes.CDLL(str(target))
    lib.path_attention.restype = ctypes.c_int
    lib.path_attention.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 5 \
        + [ctypes.c_int64] * 7 + [ctypes.c_float]
    return lib


def available(dtype: torch.dtype, head_dim: int, device: torch.device) -> bool:
    """Whether generated tokens of a model of this dtype and head width on ``device`` use the kernel."""
    return device.type == "cpu" and dtype in KERNEL_DTYPES and head_dim in HEAD_DIMS and library() is not None


def path_keys(lengths: torch.Tensor, region: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each query's keys, for ``path_attention``: ``prefix [B, T]`` committed slots seen, ``npath
    [B, T]`` and ``path [B, T, P]`` the region slots it sees, root first (``region [B, T, N]`` lists
    parents before children). Padding (``valid`` false) sees only the slot just past the region."""
    b, t, n = region.shape
    count = region.sum(dim=-1)
    order = torch.argsort((~region).to(torch.int8), dim=-1, stable=True)[..., : max(1, int(count.max()))]
    path = lengths[:, None, None] + order
    path[..., 0] = torch.where(valid, path[..., 0], lengths[:, None] + n)
    npath = torch.where(valid, count, 1)
    prefix = torch.where(valid, lengths[:, None].expand(b, t), 0)
    return prefix.contiguous(), npath.contiguous(), path.contiguous()


def path_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                   keys: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``[B, T, H, D]`` attention of ``q [B, T, H, D]`` over cache layers ``k``/``v [R, S, KVH, D]``
    (rows ``rows [B]``), each query over ``path_keys``' keys."""
    lib = library()
    if lib is None:  # a tensor-parallel worker whose leader loaded the kernel
        raise RuntimeError("path_attention: this process cannot build or load the CPU attention kernel (see the "
                           "warning above) though the forward's form asks for it")
    prefix, npath, path = keys
    b, t, h, d = q.shape
    kvh = k.shape[2]
    qf = q.to(torch.float32).contiguous()
    out = torch.empty(b, t, h, d, dtype=torch.float32)
    failed = lib.path_attention(
        qf.data_ptr(), k.data_ptr(), v.data_ptr(), int(k.dtype == torch.bfloat16), rows.data_ptr(), prefix.data_ptr(),
        npath.data_ptr(), path.data_ptr(), out.data_ptr(), b, t, h, kvh, d, k.shape[1], path.shape[-1], d ** -0.5)
    if failed == 2:
        raise ValueError(f"path_attention: head width {d} is not one of {HEAD_DIMS}")
    if failed:
        raise MemoryError("path_attention: out of memory for its score buffers")
    return out.to(q.dtype)
