#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the project and its pinned dependencies.
# Usage: build_scripts/setup.sh            (re-running it only checks that everything is in place)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
cd "$ROOT"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating virtual environment .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
echo "[setup] installing specinfer and pinned dependencies (requirements.lock)"
# torch==2.13.0 first: the CPU wheel, so no resolver ever reaches for the CUDA build.
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e ".[dev,serve]"
.venv/bin/python -c "import specinfer, torch, transformers; print('[setup] ok: torch', torch.__version__, '| transformers', transformers.__version__)"
