"""Through Triton: perf_analyzer against `specinfer` and `incremental` at several concurrencies.

Reports requests/s and latency p50/p99 (perf_analyzer, gRPC streaming), and output tokens/s
(requests/s times the mean tokens per request, from the server's specinfer_* counters).

  .venv/bin/python build_scripts/bench_triton.py --concurrency 1,4 --max-tokens 32
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from specinfer.serving.launcher import server_env, start_server

ROOT = Path(__file__).resolve().parents[1]
def counters(server, model: str) -> dict[str, float]:
    """One model's ``specinfer_*`` counters by name."""
    return {key.split("{")[0]: value for key, value in server.metrics().items() if key.endswith(f'{{model="{model}"}}')}


def run_perf(server, model: str, concurrency: int, data: Path, interval_ms: int) -> dict:
    report = data.parent / f"{model}-{concurrency}.csv"
    decoder = f"{model}_llm"
    before = counters(server, decoder)
    cmd = [str(Path(sys.executable).parent / "perf_analyzer"), "-m", model, "-u", server.grpc_url, "-i", "grpc",
           "--streaming", "--input-data", str(data), "--concurrency-range", f"{concurrency}:{concurrency}",
           "-p", str(interval_ms), "-s", "25", "-r", "6", "--percentile", "50", "-f", str(report)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=server_env())
    if run.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed:\n{run.stdout[-3000:]}{run.stderr[-2000:]}")
    after = counters(server, decoder)
    row = next(csv.DictReader(report.open()))
    tokens = after["specinfer_output_tokens"] - before["specinfer_output_tokens"]
    requests = after["specinfer_requests_finished"] - before["specinfer_requests_finished"]
    steps = after["specinfer_llm_steps"] - before["specinfer_llm_steps"]
    rps = float(row["Inferences/Second"])
    return {"model": model, "concurrency": concurrency, "requests_per_s": rps,
            "output_tokens_per_s": rps * tokens / requests, "tokens_per_request": tokens / requests,
            "tokens_per_llm_step": tokens / steps, "p50_ms": float(row["p50 latency"]) / 1000,
            "p99_ms": float(row["p99 latency"]) / 1000, "command": " ".join(cmd)}


def run_triton(repository: Path, prompts: list[str], max_tokens: int, concurrencies: tuple[int, ...],
               interval_ms: int = 8000) -> list[dict]:
    """Start a server on ``repository`` and profile both models at each concurrency."""
    server = start_server(repository)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "input.json"
            data.write_text(json.dumps({"data": [{"text_input": [p], "max_tokens": [max_tokens]} for p in prompts]}))
            for c in concurrencies:
                for model in ("specinfer", "incremental"):
                    rows.append(run_perf(server, model, c, data, interval_ms))
                    r = rows[-1]
                    print(f"  {model:<12} concurrency {c:>2}: {r['requests_per_s']:6.2f} req/s "
                          f"{r['output_tokens_per_s']:7.1f} tok/s  p50 {r['p50_ms']:6.0f} ms  p99 {r['p99_ms']:6.0f} ms",
                          flush=True)
    finally:
        server.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--interval-ms", type=int, default=8000)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    from benchmark import held_out_prompts
    from specinfer.tokenizer import TextTokenizer

    demo = ROOT / "engines" / "demo"
    rows = run_triton(Path(args.model_repository), held_out_prompts(demo, TextTokenizer.from_checkpoint(demo / "llm"))[:8], args.max_tokens,
                      tuple(int(x) for x in args.concurrency.split(",")), args.interval_ms)
    print("command (per model and concurrency):", rows[0]["command"].replace(rows[0]["model"], "MODEL", 1))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
