"""The model repository served by a real tritonserver (the session's shared server, conftest.py)."""
from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from served import MAX_BATCH, PROMPTS, expected, grpc_inputs, grpc_stream, ids, post, stream_events, wait_for
from specinfer.serving.launcher import server_env


def test_http_generate_equals_incremental_engine(served):
    server, engine, _ = served
    for prompt in PROMPTS[:5]:
        status, out = post(server, "/v2/models/specinfer/generate", {"text_input": prompt, "max_tokens": 16})
        assert status == 200, out
        want = expected(engine, prompt, 16)
        assert ids(out) == want
        assert out["text_output"] == prompt + engine.tokenizer.decode(want)  # non-streamed: the prompt echoed
        assert out["num_output_tokens"] == 16 and out["num_llm_steps"] <= 16
        assert out["total_accepted_draft_tokens"] <= out["total_draft_tokens"]


@pytest.mark.parametrize("model", ["specinfer", "specinfer_bls"])
def test_chat_template_input_formats_the_prompt(served, model):
    server, engine, _ = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def main():"}]
    for text, chat in (("def main():", [messages[1]]), (json.dumps(messages), messages)):
        status, out = post(server, f"/v2/models/{model}/generate",
                           {"text_input": text, "max_tokens": 10, "apply_chat_template": True})
        assert status == 200, out
        prompt = engine.tokenizer.apply_chat_template(chat)
        assert prompt.startswith("<s>") and prompt.endswith("<s>assistant: ")
        assert ids(out) == expected(engine, prompt, 10)
    status, out = post(server, f"/v2/models/{model}/generate",
                       {"text_input": "def main():", "max_tokens": 10, "apply_chat_template": False})
    assert status == 200 and ids(out) == expected(engine, "def main():", 10)


def test_incremental_model_has_the_same_interface_and_output(served):
    server, engine, _ = served
    status, out = post(server, "/v2/models/incremental/generate", {"text_input": PROMPTS[0], "max_tokens": 12})
    assert status == 200, out
    assert ids(out) == expected(engine, PROMPTS[0], 12)
    assert out["num_llm_steps"] == 12 and out["total_draft_tokens"] == 0


def test_http_stream_deltas_concatenate_to_the_full_text(served):
    server, engine, _ = served
    for prompt in PROMPTS[5:]:
        events = stream_events(server, "specinfer", {"text_input": prompt, "max_tokens": 24})
        _, full = post(server, "/v2/models/specinfer/generate", {"text_input": prompt, "max_tokens": 24})
        assert len(events) > 1
        assert sum((ids(e) for e in events), []) == ids(full) == expected(engine, prompt, 24)
        assert prompt + "".join(e["text_output"] for e in events) == full["text_output"]
        assert all("\ufffd" not in e["text_output"] for e in events) or "\ufffd" in full["text_output"]
        assert events[-1]["num_output_tokens"] == 24


def test_grpc_streaming_equals_incremental_engine(served):
    server, engine, _ = served
    for prompt in PROMPTS[:3]:
        chunks = grpc_stream(server, prompt, 20)
        assert sum((c for c, _ in chunks), []) == expected(engine, prompt, 20)
        assert "".join(t for _, t in chunks) == engine.tokenizer.decode(expected(engine, prompt, 20))


def test_concurrent_requests_share_verification_batches(served):
    server, engine, _ = served
    before = server.metrics()
    jobs = [(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), 8 + 3 * i) for i in range(2 * MAX_BATCH)]
    results: dict[int, tuple[int, dict]] = {}

    def run(i: int) -> None:
        results[i] = post(server, "/v2/models/specinfer/generate", {"text_input": jobs[i][0], "max_tokens": jobs[i][1]})

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    for i, (prompt, n) in enumerate(jobs):
        status, out = results[i]
        assert status == 200, out
        assert ids(out) == expected(engine, prompt, n), f"request {i}"
    after = server.metrics()
    key = '{model="specinfer_llm"}'
    forwards = after["specinfer_llm_forwards" + key] - before["specinfer_llm_forwards" + key]
    verified = after["specinfer_llm_forward_requests" + key] - before["specinfer_llm_forward_requests" + key]
    assert verified / forwards > 2.0, f"mean requests per LLM forward {verified / forwards:.2f}"
    step_s, forward_s = (after[name + key] - before[name + key] for name in ("specinfer_step_seconds", "specinfer_forward_seconds"))
    assert 0 < forward_s < step_s < elapsed  # seconds inside steps, of which inside forwards


def test_cancelled_stream_frees_its_slot(served):
    """Cancelled on the decoding model itself (through the ensemble Triton 2.51 does not pass a
    cancellation on: clients that cancel use ``specinfer_bls``, see test_faults.py). Afterwards
    every row holds a request again at once: long streams wait for all ``MAX_BATCH`` to run rather
    than sampling short requests' overlap, which a fast machine finishes before the last arrive."""
    server, engine, _ = served
    key = '{model="specinfer_llm"}'
    count = lambda name: server.metrics()[name + key]  # noqa: E731
    cancelled = count("specinfer_requests_cancelled")
    chunks = grpc_stream(server, engine.encode(PROMPTS[0]), 3000, cancel_after=2, model="specinfer_llm")
    assert len(chunks) == 2
    assert wait_for(lambda: count("specinfer_requests_cancelled") == cancelled + 1)
    assert wait_for(lambda: count("specinfer_running_requests") == 0)
    clients = []
    for prompt in PROMPTS[:MAX_BATCH]:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        client.start_stream(callback=lambda result, error: None)
        client.async_stream_infer("specinfer_llm", grpc_inputs(engine.encode(prompt), 3000))
        clients.append(client)
    try:
        assert wait_for(lambda: count("specinfer_running_requests") == MAX_BATCH)  # every row was free again
    finally:
        for client in clients:
            client.stop_stream(cancel_requests=True)
    assert wait_for(lambda: count("specinfer_requests_cancelled") == cancelled + 1 + MAX_BATCH)
    assert wait_for(lambda: count("specinfer_running_requests") == 0)
    status, out = post(server, "/v2/models/specinfer/generate", {"text_input": PROMPTS[1], "max_tokens": 30})
    assert status == 200 and ids(out) == expected(engine, PROMPTS[1], 30)


@pytest.mark.parametrize("body, status, message", [
    ({"max_tokens": 4}, 400, "missing required input(s) ['text_input']"),
    ({"text_input": "", "max_tokens": 4}, 400, "text_input is empty"),
    ({"text_input": "hi", "max_tokens": 0}, 400, "max_tokens must be an integer >= 1"),
    ({"text_input": "hi", "max_tokens": 100000}, 400, "plus max_tokens (100000) exceeds the context"),
    ({"text_input": "hi", "max_tokens": 4, "temperature": -0.5}, 400, "temperature must be >= 0"),
    ({"text_input": "hi", "max_tokens": 4, "top_p": 1.5}, 400, "top_p must be in (0, 1]"),
    ({"text_input": "hi", "max_tokens": 4, "top_k": -2}, 400, "top_k must be an integer >= 0"),
    ({"text_input": "hi", "max_tokens": [4, 5]}, 400, "batch size does not match"),  # Triton's own check
    (b'{"text_input": "\xff\xfehi", "max_tokens": 4}', 400, "text_input is not valid UTF-8"),
])
def test_bad_request_fails_alone(served, body, status, message):
    server, engine, _ = served
    good: dict[int, tuple[int, dict]] = {}

    def run(i: int) -> None:
        good[i] = post(server, "/v2/models/specinfer/generate", {"text_input": PROMPTS[i], "max_tokens": 10})

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    got_status, out = post(server, "/v2/models/specinfer/generate", body)
    for t in threads:
        t.join()
    assert got_status == status and message in out["error"], out
    assert all(good[i][0] == 200 and ids(good[i][1]) == expected(engine, PROMPTS[i], 10) for i in range(3))


def test_grpc_bad_requests_name_the_field(served):
    """Streaming (how the decoupled ensemble is reached) carries errors in-band with their message;
    a unary call to a non-decoupled step gets the INVALID_ARGUMENT status."""
    server, _, _ = served
    client = grpcclient.InferenceServerClient(server.grpc_url)
    text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"hi"]], dtype=np.object_))
    max_tokens = grpcclient.InferInput("max_tokens", [1, 1], "INT32")
    max_tokens.set_data_from_numpy(np.array([[0]], dtype=np.int32))
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("specinfer", [text, max_tokens])
    _, error = results.get(timeout=60)
    client.stop_stream()
    assert error is not None and "max_tokens must be an integer >= 1, got 0" in error.message()
    empty = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    empty.set_data_from_numpy(np.array([[b""]], dtype=np.object_))
    with pytest.raises(Exception) as exc:
        client.infer("preprocessing", [empty, max_tokens])
    assert "INVALID_ARGUMENT" in str(exc.value.status()) and "text_input is empty" in exc.value.message()


def test_metrics_grow_by_the_served_amounts(served):
    server, _, _ = served
    key = '{model="specinfer_llm"}'
    before = server.metrics()
    outs = [post(server, "/v2/models/specinfer/generate", {"text_input": p, "max_tokens": 14})[1] for p in PROMPTS[:4]]
    after = server.metrics()
    for metric, field in [("specinfer_output_tokens", "num_output_tokens"), ("specinfer_llm_steps", "num_llm_steps"),
                          ("specinfer_draft_tokens", "total_draft_tokens"),
                          ("specinfer_accepted_draft_tokens", "total_accepted_draft_tokens")]:
        assert after[metric + key] - before[metric + key] == sum(o[field] for o in outs), metric
    assert after["specinfer_requests_finished" + key] - before["specinfer_requests_finished" + key] == 4
    steps = sum(o["num_llm_steps"] - 1 for o in outs)  # verification steps (prefill excluded)
    assert after["specinfer_tokens_per_step_count" + key] - before["specinfer_tokens_per_step_count" + key] == steps


def test_perf_analyzer_runs_against_both_models(served, tmp_path):
    server, _, _ = served
    data = tmp_path / "input.json"
    data.write_text(json.dumps({"data": [{"text_input": [p], "max_tokens": [8]} for p in PROMPTS[:4]]}))
    env = server_env()
    for model in ("specinfer", "incremental"):
        cmd = [str(Path(sys.executable).parent / "perf_analyzer"), "-m", model, "-u", server.grpc_url, "-i", "grpc",
               "--streaming", "--input-data", str(data), "--concurrency-range", "1:4:3",
               "--measurement-interval", "1500", "--stability-percentage", "999"]
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        assert "Concurrency: 4" in run.stdout


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise``, ``never``), None where it has none."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text.split("[")[1].split("]")[0] if "[" in text else None


@pytest.mark.skipif(thp_mode() != "madvise", reason="only under THP 'madvise' do huge pages show that torch asked for them")
def test_decoding_models_hold_their_buffers_on_huge_pages(served):
    """The entry point turns torch's huge-page allocation on before torch loads (measured on CPU: forwards
    ~2% faster). The test model's K/V tensors are ~4 MB per layer, above torch's 2 MB threshold."""
    server = served[0]
    stubs: dict[str, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != server.process.pid:  # the server's children only
                continue
            command = (stat.parent / "cmdline").read_bytes().split(b"\0")
            rollup = (stat.parent / "smaps_rollup").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for model in ("specinfer_llm", "incremental_llm", "postprocessing"):
            if any(f"/{model}/1/model.py".encode() in part for part in command):
                stubs[model] = max(stubs.get(model, 0), int(rollup.split("AnonHugePages:")[1].split()[0]))
    assert set(stubs) == {"specinfer_llm", "incremental_llm", "postprocessing"}, stubs
    assert stubs["specinfer_llm"] > 0 and stubs["incremental_llm"] > 0, stubs  # kB: weights and KV cache
