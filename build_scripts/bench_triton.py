"""Through Triton: closed-loop clients against `specinfer` and `incremental` at several concurrencies.

``C`` clients each send a request over HTTP (`/generate`), wait for its answer and send the next,
until ``C x rounds`` requests are done. Reports output tokens/s (wall time of the whole run), latency
p50/p99 and tokens per LLM step (from the server's specinfer_* counters). perf_analyzer measures
windows of fixed length, and requests of several seconds (CPU) left its windows nearly empty.
``--balanced``: each concurrency measured twice, in the order specinfer, incremental, incremental,
specinfer, each model's two halves pooled: the order (which model runs first after the previous
point) and a drift across the point weigh on both alike. ``--control``: ``incremental_b`` as well, an
identical copy of ``incremental`` served by a process of its own (an A/A control: how far two
identical server processes differ in one run); with ``--balanced`` the order is S I B B I S, so the
twin runs twice in a row where ``incremental`` does not (one pass each way, no more).

  .venv/bin/python build_scripts/bench_triton.py --concurrency 1,4 --max-tokens 32
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import nullcontext
from itertools import count
from pathlib import Path

from specinfer.serving.launcher import Server, start_server

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("specinfer", "incremental")
CONTROL = "incremental_b"  # --control: incremental's twin
SUMMED = ("specinfer_output_tokens", "specinfer_llm_steps", "specinfer_llm_forwards", "specinfer_llm_forward_requests",
          "specinfer_prefill_forwards", "specinfer_step_seconds", "specinfer_forward_seconds")  # the server's counters a measurement reads, grown over it


def counters(server, model: str) -> dict[str, float]:
    """One model's ``specinfer_*`` counters by name."""
    return {key.split("{")[0]: value for key, value in server.metrics().items() if key.endswith(f'{{model="{model}"}}')}


def closed_loop(server, model: str, prompts: list[str], max_tokens: int, concurrency: int, rounds: int) -> dict:
    url = f"http://{server.http_url}/v2/models/{model}/generate"
    jobs, latencies, lock = count(), [], threading.Lock()
    total = concurrency * rounds

    def client() -> None:
        while (i := next(jobs)) < total:
            body = json.dumps({"text_input": prompts[i % len(prompts)], "max_tokens": max_tokens}).encode()
            start = time.perf_counter()
            urllib.request.urlopen(urllib.request.Request(url, body, {"Content-Type": "application/json"})).read()
            with lock:
                latencies.append(time.perf_counter() - start)

    before = counters(server, f"{model}_llm")
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    after = counters(server, f"{model}_llm")
    grown = {name: after[name] - before[name] for name in SUMMED}
    return summary(model, concurrency, [1000 * x for x in latencies], seconds, grown)


def summary(model: str, concurrency: int, ms: list[float], seconds: float, grown: dict[str, float]) -> dict:
    """The figures of one measurement. Where the server's time went: ``forward_ms`` per LLM forward
    (model forwards; drafting included where it ran), ``host_ms`` per forward (the engine's step
    outside forwards; both per verification forward, prefills included), ``busy``: the share of the wall
    time inside engine steps (the rest the model waited for requests or for its responses to leave),
    ``batch``: requests per verification forward, ``prefills``: prefill forwards (one per step that
    admitted requests: requests arriving apart cost one each)."""
    ms, tokens, forwards = sorted(ms), grown["specinfer_output_tokens"], max(grown["specinfer_llm_forwards"], 1)
    step_s, forward_s = grown["specinfer_step_seconds"], grown["specinfer_forward_seconds"]
    return {"model": model, "concurrency": concurrency, "requests": len(ms), "seconds": seconds,
            "requests_per_s": len(ms) / seconds, "output_tokens_per_s": tokens / seconds,
            "tokens_per_llm_step": tokens / grown["specinfer_llm_steps"], "p50_ms": statistics.median(ms),
            "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))], "forward_ms": 1000 * forward_s / forwards,
            "host_ms": 1000 * (step_s - forward_s) / forwards, "busy": step_s / seconds,
            "batch": grown["specinfer_llm_forward_requests"] / forwards, "prefills": grown["specinfer_prefill_forwards"],
            "latencies_ms": ms,
            "grown": grown}


def pooled(halves: list[dict]) -> dict:
    """One model's measurements at one concurrency as one: counters and time summed, latencies pooled."""
    return summary(halves[0]["model"], halves[0]["concurrency"], [x for h in halves for x in h["latencies_ms"]],
                   sum(h["seconds"] for h in halves), {k: sum(h["grown"][k] for h in halves) for k in SUMMED})


def with_control(repository: Path, copy: Path) -> Path:
    """``repository`` copied into ``copy`` (a folder beside it, so that its relative paths still
    resolve) with ``incremental_b``: ``incremental`` again under another name, so in a process of its
    own. Beside the others it shows how far two identical server processes differ in one run."""
    shutil.copytree(repository, copy, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    for model in ("incremental", "incremental_llm"):
        twin = copy / model.replace("incremental", CONTROL)
        shutil.copytree(copy / model, twin)
        config = twin / "config.pbtxt"
        text = re.sub(r'^name: "incremental(_llm)?"', rf'name: "{CONTROL}\1"', config.read_text(), flags=re.M)
        config.write_text(text.replace('model_name: "incremental_llm"', f'model_name: "{CONTROL}_llm"'))
    return copy


def sweep(repository: Path, concurrencies: tuple[int, ...], measure: Callable[[Server, str, int], dict],
          describe: Callable[[dict], str], warm_up: Callable[[Server, str], None] | None = None,
          pool: Callable[[list[dict]], dict] | None = None, models: tuple[str, ...] = MODELS) -> list[dict]:
    """Start a server on ``repository`` and measure the models at each concurrency, alternating;
    with ``pool``, twice per concurrency in the order A B B A, each model's halves pooled by it."""
    server = start_server(repository)
    rows = []
    orders = [models, models[::-1]] if pool else [models]
    try:
        for model in models if warm_up else ():  # first requests pay one-time costs
            warm_up(server, model)
        for c in concurrencies:
            halves: dict[str, list[dict]] = {model: [] for model in models}
            for order in orders:
                for model in order:
                    halves[model].append(measure(server, model, c))
            for model in models:
                rows.append(pool(halves[model]) if pool else halves[model][0])
                print(f"  {model:<13} concurrency {c:>2}: {describe(rows[-1])}", flush=True)
    finally:
        server.stop()
    return rows


def run_triton(repository: Path, prompts: list[str], max_tokens: int, concurrencies: tuple[int, ...],
               rounds: int = 2, balanced: bool = False, control: bool = False) -> list[dict]:
    """Closed-loop clients against both models at each concurrency (``balanced``: A B B A, pooled;
    ``control``: ``incremental_b`` too, see ``with_control``)."""
    models = (*MODELS, CONTROL) if control else MODELS
    copy = tempfile.TemporaryDirectory(dir=repository.resolve().parent, prefix=".control-") if control else nullcontext()
    with copy as folder:
        rows = sweep(with_control(repository, Path(folder)) if control else repository, concurrencies,
                     lambda server, model, c: closed_loop(server, model, prompts, max_tokens, c, rounds),
                     lambda r: f"{r['output_tokens_per_s']:7.1f} tok/s  {r['tokens_per_llm_step']:.2f} tok/step  "
                               f"p50 {r['p50_ms']:6.0f} ms  p99 {r['p99_ms']:6.0f} ms  forward {r['forward_ms']:5.1f} ms  "
                               f"host {r['host_ms']:4.2f} ms  busy {r['busy']:.0%}  batch {r['batch']:.2f}  prefills {r['prefills']:.0f}",
                     warm_up=lambda server, model: closed_loop(server, model, prompts, 8, 1, 1) and None,
                     pool=pooled if balanced else None, models=models)
    for c in concurrencies:
        rate = {r["model"]: r["output_tokens_per_s"] for r in rows if r["concurrency"] == c}
        print(f"  concurrency {c:>2}: " + "  ".join(f"{m} / incremental {rate[m] / rate['incremental']:.3f}x"
                                                  for m in models if m != "incremental"), flush=True)
    return [{k: v for k, v in r.items() if k != "latencies_ms"} for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="requests per client")
    ap.add_argument("--balanced", action="store_true",
                    help="each concurrency twice, specinfer-incremental-incremental-specinfer, halves pooled")
    ap.add_argument("--control", action="store_true",
                    help="also measure incremental_b, an identical copy of incremental in its own process (A/A control)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    from benchmark import held_out_prompts
    from specinfer.tokenizer import TextTokenizer

    demo = ROOT / "engines" / "demo"
    rows = run_triton(Path(args.model_repository), held_out_prompts(demo, TextTokenizer.from_checkpoint(demo / "llm"))[:8], args.max_tokens,
                      tuple(int(x) for x in args.concurrency.split(",")), args.rounds, args.balanced, args.control)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
