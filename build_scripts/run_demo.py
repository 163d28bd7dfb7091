"""The main job: a real tritonserver on model_repository/ (SmolLM2-135M-Instruct + the demo SSMs).

Streams two answers from the `specinfer` ensemble over gRPC, a chat question (formatted by the
model's chat template: the ensemble's `apply_chat_template` input) and a plain-text completion,
prints each with tokens per LLM step, then sends the same requests to `incremental` and prints the
speedup (median of a few runs each).
"""
from __future__ import annotations

import argparse
import queue
import statistics
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from specinfer.config import parse_proposers
from specinfer.serving.launcher import start_server
from specinfer.serving.parameters import read_pbtxt_parameters

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "model_repository" / "specinfer_llm" / "config.pbtxt"  # the served proposers


def stream(client, model: str, prompt: str, max_tokens: int, chat: bool, echo: bool = False) -> tuple[str, dict, float]:
    """One streamed request; returns the text, the final counters and the wall time."""
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    inputs = []
    for name, value, dtype in [("text_input", np.array([prompt.encode()], dtype=np.object_), "BYTES"),
                               ("max_tokens", np.array([max_tokens], dtype=np.int32), "INT32"),
                               ("stream", np.array([True]), "BOOL"),
                               ("apply_chat_template", np.array([chat]), "BOOL")]:
        t = grpcclient.InferInput(name, [1, 1], dtype)  # a leading batch dimension, as TensorRT-LLM's clients send
        t.set_data_from_numpy(value[None])
        inputs.append(t)
    start = time.perf_counter()
    client.async_stream_infer(model, inputs, enable_empty_final_response=True)
    text, counters = "", {}
    while True:
        result, error = results.get(timeout=300)
        if error is not None:
            raise RuntimeError(f"{model}: {error.message()}")
        out = result.as_numpy("text_output")
        if out is not None:
            delta = out[0].decode()
            text += delta
            if echo:
                print(delta, end="", flush=True)
            counters = {k: result.as_numpy(k)[0].item() for k in
                        ("num_output_tokens", "num_llm_steps", "total_draft_tokens", "total_accepted_draft_tokens")}
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    seconds = time.perf_counter() - start
    client.stop_stream()
    return text, counters, seconds


def by_proposer(server, proposers: tuple[str, ...]) -> dict[str, float]:
    """specinfer_llm's accepted draft tokens so far per proposer (Prometheus; a token both proposed counts for both)."""
    metrics = server.metrics()
    return {p: metrics.get(f'specinfer_accepted_draft_tokens{{model="specinfer_llm",proposer="{p}"}}', 0.0)
            for p in proposers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--chat", default="What are three good habits for writing clean Python code?")
    ap.add_argument("--text", default="def fibonacci(n):\n    ")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    proposers = parse_proposers(read_pbtxt_parameters(CONFIG.read_text()).get("proposers", ""))
    print("[demo] starting tritonserver on model_repository/ ...", flush=True)
    server = start_server(ROOT / "model_repository")
    try:
        print(f"[demo] server ready in {server.started_s:.1f} s (HTTP {server.http_url}, gRPC {server.grpc_url})")
        client = grpcclient.InferenceServerClient(server.grpc_url)
        for prompt, chat in ((args.chat, True), (args.text, False)):
            kind = "chat message (chat template applied)" if chat else "plain text"
            print(f"\n[demo] {kind}: {prompt!r}\n[demo] specinfer streams:\n", end="")
            before = by_proposer(server, proposers)
            text, c, _ = stream(client, "specinfer", prompt, args.max_tokens, chat, echo=True)
            time.sleep(0.2)  # the counters grow once the request has finished
            after = by_proposer(server, proposers)
            print(f"\n[demo] {c['num_output_tokens']} tokens in {c['num_llm_steps']} LLM steps: "
                  f"{c['num_output_tokens'] / c['num_llm_steps']:.2f} tokens per LLM step, "
                  f"{c['total_accepted_draft_tokens']}/{c['total_draft_tokens']} draft tokens accepted "
                  "(proposed by " + ", ".join(f"{p}: {after[p] - before[p]:.0f}" for p in after) + ")")
            times = {}
            for model in ("specinfer", "incremental"):
                runs = [stream(client, model, prompt, args.max_tokens, chat) for _ in range(args.repeat)]
                assert all(r[0] == text for r in runs), f"{model} gave another text"
                times[model] = statistics.median(r[2] for r in runs)
            print(f"[demo] same request, median of {args.repeat}: specinfer {times['specinfer'] * 1000:.0f} ms, "
                  f"incremental {times['incremental'] * 1000:.0f} ms -> speedup "
                  f"{times['incremental'] / times['specinfer']:.2f}x (identical text)")
        print("\n[demo] to keep a server running for your own clients:\n"
              "  .venv/bin/python build_scripts/launch_server.py --model-repository model_repository "
              "--http-port 8000 --grpc-port 8001 --metrics-port 8002\n"
              "  curl -X POST localhost:8000/v2/models/specinfer/generate "
              "-d '{\"text_input\": \"What is a black hole?\", \"max_tokens\": 64, \"apply_chat_template\": true}'")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
