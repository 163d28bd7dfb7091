"""genai-perf against `specinfer` and `incremental`: TTFT, inter-token latency, output token throughput.

NVIDIA's LLM load tool, run as its docs run it against TensorRT-LLM's ensemble (Triton's gRPC endpoint,
`--endpoint-type kserve --backend tensorrtllm --streaming`), with the LLM folder as its tokenizer
(`tokenizer_config.json` gives it the special tokens). genai-perf 0.0.16 lives in its own virtual
environment (its dependencies clash with this project's pins); `--install` creates it once with pip.

  .venv/bin/python build_scripts/bench_genai_perf.py --install --concurrency 1,2,4,8,16 --output-tokens 32
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_triton import sweep
from specinfer.serving.launcher import server_env

ROOT = Path(__file__).resolve().parents[1]
GENAI_PERF = "genai-perf==0.0.16"
VENV = ROOT / ".venv-genai-perf"
METRICS = {"time_to_first_token": "ttft_ms", "inter_token_latency": "itl_ms", "output_token_throughput": "output_tok_s"}


def install(venv: Path = VENV) -> Path:
    """genai-perf's own venv (idempotent); returns its executable."""
    exe = venv / "bin" / "genai-perf"
    if not exe.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", GENAI_PERF], check=True)
    return exe


def profile(exe: Path, server, model: str, concurrency: int, args: argparse.Namespace, artifacts: Path) -> dict:
    """One genai-perf run; its averages of the three figures (genai-perf's own JSON export)."""
    out = artifacts / f"{model}-c{concurrency}"
    cmd = [str(exe), "profile", "-m", model, "--endpoint-type", "kserve", "--backend", "tensorrtllm", "--streaming",
           "-u", server.grpc_url, "--concurrency", str(concurrency), "--num-prompts", str(args.num_prompts),
           "--synthetic-input-tokens-mean", str(args.input_tokens), "--synthetic-input-tokens-stddev", "0",
           "--output-tokens-mean", str(args.output_tokens), "--output-tokens-stddev", "0",
           "--measurement-interval", str(args.interval_ms), "--tokenizer", str(args.tokenizer),
           "--artifact-dir", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=server_env())
    if run.returncode != 0:
        raise RuntimeError(f"genai-perf failed for {model} at concurrency {concurrency}:\n"
                           f"{run.stdout[-3000:]}{run.stderr[-2000:]}")
    export = next(out.rglob("*genai_perf.json"))
    stats = json.loads(export.read_text())
    row = {"model": model, "concurrency": concurrency, "command": " ".join(cmd)}
    for key, name in METRICS.items():
        row[name] = float(stats[key]["avg"])
    return row


def run_genai_perf(repository: Path, args: argparse.Namespace) -> list[dict]:
    exe = install() if args.install else Path(args.genai_perf)
    with tempfile.TemporaryDirectory() as tmp:
        return sweep(repository, tuple(int(x) for x in args.concurrency.split(",")),
                     lambda server, model, c: profile(exe, server, model, c, args, Path(tmp)),
                     lambda r: f"TTFT {r['ttft_ms']:7.1f} ms  inter-token {r['itl_ms']:6.1f} ms  "
                               f"{r['output_tok_s']:7.1f} output tok/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    ap.add_argument("--tokenizer", default=str(ROOT / "engines" / "demo" / "llm"))
    ap.add_argument("--install", action="store_true", help=f"create {VENV.name} with {GENAI_PERF} if missing")
    ap.add_argument("--genai-perf", default=str(VENV / "bin" / "genai-perf"), help="the genai-perf executable")
    ap.add_argument("--concurrency", default="1,2,4,8,16")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-tokens", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--interval-ms", type=int, default=20000)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    rows = run_genai_perf(Path(args.model_repository), args)
    print("command (per model and concurrency):", rows[0]["command"].replace(f"-m {rows[0]['model']}", "-m MODEL"))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
