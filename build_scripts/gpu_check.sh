#!/usr/bin/env bash
# One GPU check in at most 8 minutes: versions, every `gpu`-marked test (kernel vs SDPA, CUDA engine parity,
# CUDA graphs on and off, ONNX Runtime's CUDA provider where installed, offloading), a short benchmark, the
# offload benchmark (bench_offload.py: streamed layers, H2D bandwidth, overlap, HF + accelerate), the
# device's rounding classes (cuda_rounding.py: which kernels give a row other bits beside other rows), one table.
#
#   build_scripts/gpu_check.sh          # from the repository root, on a machine with a CUDA GPU
#
# Uses the machine's own python3 with torch, triton, transformers, safetensors, tokenizers and pytest
# (no venv, no install, no tritonserver): the package is put on PYTHONPATH. Every stage is timed and
# runs under its own time limit; a failing stage is reported and the next one still runs. Logs and
# the table go to $OUT when it is set (else a temporary folder). Exit status: 0 if every stage passed.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
LOGS=${OUT:-$(mktemp -d)}
mkdir -p "$LOGS"
export PYTHONPATH="$PWD/backend${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
SUMMARY=()
FAILED=0

# stage NAME LIMIT_S COMMAND...: run it with its output in $LOGS/NAME.log (and on screen), time it.
stage() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]} took=$((SECONDS - start))
    [ "$rc" -eq 0 ] || FAILED=1
    local verdict=ok
    [ "$rc" -eq 0 ] || verdict="FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', time limit'))"
    SUMMARY+=("$(printf '%-10s %5ss  %s' "$name" "$took" "$verdict")")
}

stage versions 30 "$PY" -c '
import sys, torch, triton, transformers
print("python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton.__version__,
      "| transformers", transformers.__version__)
print("cuda", torch.version.cuda, "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
assert torch.cuda.is_available(), "no CUDA device visible to torch"
'
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv \
    > "$LOGS/nvidia-smi.csv" 2>&1 || true

# Only the files holding gpu tests: others import what this machine lacks (tritonclient).
GPU_TESTS=$(grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ')
stage gpu-tests 300 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rfEs --durations=10 \
    --junitxml="$LOGS/gpu-tests.xml" $GPU_TESTS
stage benchmark 140 "$PY" build_scripts/gpu_bench.py --json "$LOGS/benchmark.json"
stage offload 100 "$PY" build_scripts/bench_offload.py --json "$LOGS/offload.json"
stage rounding 120 "$PY" build_scripts/cuda_rounding.py

{
    echo
    echo "=== gpu_check summary ($(head -n 1 "$LOGS/versions.log" 2>/dev/null))"
    grep -h "^cuda" "$LOGS/versions.log" 2>/dev/null
    printf '%s\n' "${SUMMARY[@]}"
    grep -E "(passed|failed|skipped|error).* in [0-9.]+s" "$LOGS/gpu-tests.log" | tail -n 1
    sed -n '/^bfloat16\|^float/,$p' "$LOGS/benchmark.log"
    sed -n '/^offload, /,$p' "$LOGS/offload.log"
    grep -E "^(bfloat16|float32|engine) " "$LOGS/rounding.log"
    echo "logs: $LOGS"
} | tee "$LOGS/table.txt"
exit $FAILED
