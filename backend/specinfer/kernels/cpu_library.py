"""The CPU kernels' one shared library (``path_attention.cpp``, ``rows_linear.cpp``), compiled on first use.

The two load together or not at all, so the form of generated tokens is one decision per process
(``runner.ModelRunner.paths``; tensor-parallel workers get it from their leader); within it each layer
takes the kernel that fits it (``rows_linear.fits``: bfloat16 layers; float32 models attend through
``path_attention`` and keep the GEMMs for their linear layers). Compiled with the machine's C++ compiler (GCC 12 or newer, or Clang: vector shuffles)
(``-march=native``; a few seconds) into ``$SPECINFER_CACHE`` (default ``~/.cache/specinfer``), keyed
by the sources, the flags and the CPU's feature flags. Without a compiler, or where building or loading
fails, generated tokens take the GEMM form (``batch_invariance.py``), as prompts do, and a warning says
why; ``SPECINFER_CPU_KERNELS=0`` does the same on purpose, silently (A/B measurements).
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

HERE = Path(__file__).parent
SOURCES = (HERE / "path_attention.cpp", HERE / "rows_linear.cpp")
HEADERS = (HERE / "cpu_vectors.h",)
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-fopenmp", "-shared", "-fPIC"]


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
    """The compiled kernels, or ``None``: disabled, or no compiler, or building or loading them failed
    (a warning says which)."""
    if os.environ.get("SPECINFER_CPU_KERNELS", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        warnings.warn("no C++ compiler: generated tokens take the slower batch-invariant GEMM form")
        return None
    try:
        return build(compiler)
    except (OSError, RuntimeError) as exc:  # an unwritable cache, a noexec mount, a compiler that fails
        warnings.warn(f"building the CPU kernels failed, generated tokens take the slower batch-invariant GEMM "
                      f"form: {exc}")
        return None


def build(compiler: str, extra: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The library built with ``compiler`` (``extra`` flags appended: tests build the portable paths)."""
    flags = [*FLAGS, *extra]
    text = b"".join(p.read_bytes() for p in (*SOURCES, *HEADERS))
    key = hashlib.sha256(text + " ".join([compiler, *flags, cpu_flags()]).encode()).hexdigest()[:16]
    folder = Path(os.environ.get("SPECINFER_CACHE", Path.home() / ".cache" / "specinfer"))
    target = folder / f"cpu_kernels-{key}.so"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:  # another process may build the same file
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(built)], capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} exited with {result.returncode}:\n{result.stderr[-2000:]}")
            os.replace(built, target)
    lib = ctypes.CDLL(str(target))
    lib.path_attention.restype = ctypes.c_int
    lib.path_attention.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 5 \
        + [ctypes.c_int64] * 7 + [ctypes.c_float]
    lib.rows_linear.restype = ctypes.c_int
    lib.rows_linear.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3
    return lib
