"""A real tritonserver serving a repository written with ``--tensor-parallel 2``: the tokens of the
one-process engine over HTTP and gRPC streaming; a worker killed mid-request gives that request an
error response and the next request is served; unloading leaves no worker behind."""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from conftest import make_llama
from served import PROMPTS, ROOT, expected, grpc_inputs, grpc_stream, ids, post, serve, wait_for

WORKER = "specinfer.parallel.worker"


def workers_of(model: str, llm: Path) -> list[int]:
    """Pids of the tensor-parallel workers whose parent is ``model``'s Python backend stub."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            parent_cmd = Path(f"/proc/{parent}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if WORKER.encode() in cmd and str(llm).encode() in cmd and f"/{model}/".encode() in parent_cmd:
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def tp_served(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_served")
    server_engine_repo = serve(root, "--tensor-parallel", "2")
    server, engine, repo = next(server_engine_repo)
    llm = root / "llm"
    yield server, engine, llm, repo
    assert workers_of("specinfer_llm", llm) and workers_of("incremental_llm", llm)
    with pytest.raises(StopIteration):
        next(server_engine_repo)  # stops the server, asserting a clean unload
    leftover = [int(p) for p in subprocess.run(["pgrep", "-f", f"{WORKER} .*{llm}"], capture_output=True,
                                              text=True).stdout.split()]
    assert not leftover, f"workers {leftover} outlived the server"


def test_repository_runs_the_llm_on_two_ranks(tp_served):
    _, _, llm, repo = tp_served
    config = (repo / "specinfer_llm" / "config.pbtxt").read_text()
    assert 'key: "tensor_parallel_size" value: { string_value: "2" }' in config
    assert len(workers_of("specinfer_llm", llm)) == 1 and len(workers_of("incremental_llm", llm)) == 1


@pytest.mark.parametrize("model", ["specinfer", "incremental"])
def test_tokens_equal_the_one_process_engine_over_http_and_grpc(tp_served, model):
    server, engine, _, _ = tp_served
    for prompt in PROMPTS[:2]:
        want = expected(engine, prompt, 16)
        status, out = post(server, f"/v2/models/{model}/generate", {"text_input": prompt, "max_tokens": 16})
        assert status == 200, out
        assert ids(out) == want
        chunks = grpc_stream(server, prompt, 16, model=model)
        assert [t for chunk, _ in chunks for t in chunk] == want


def test_a_killed_worker_fails_its_request_and_the_next_one_is_served(tp_served):
    server, engine, llm, _ = tp_served
    (victim,) = workers_of("specinfer_llm", llm)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("specinfer", grpc_inputs(PROMPTS[0], 3000))
    result, error = results.get(timeout=120)
    assert error is None, error
    os.kill(victim, signal.SIGKILL)
    while error is None:  # tokens already on their way may still arrive, then the error
        result, error = results.get(timeout=60)
        assert error is not None or not result.get_response().parameters["triton_final_response"].bool_param
    client.stop_stream()
    assert "worker rank 1" in str(error) and "SIGKILL" in str(error), error
    want = expected(engine, PROMPTS[1], 16)
    status, out = post(server, "/v2/models/specinfer/generate", {"text_input": PROMPTS[1], "max_tokens": 16})
    assert status == 200 and ids(out) == want, out
    assert wait_for(lambda: len(workers_of("specinfer_llm", llm)) == 1)  # a new worker, not the killed one
    assert workers_of("specinfer_llm", llm) != [victim]


def test_configure_repository_refuses_a_size_the_heads_do_not_allow(tmp_path):
    llm = make_llama(tmp_path / "llm", seed=1)  # 4 heads, 2 KV heads
    (llm / "tokenizer.json").write_text("{}")  # only its presence is checked
    out = subprocess.run([sys.executable, str(ROOT / "build_scripts" / "configure_repository.py"), "--llm", str(llm),
                          "--output", str(tmp_path / "repo"), "--tensor-parallel", "3"], capture_output=True, text=True)
    assert out.returncode != 0 and "sizes that work are [1, 2, 4]" in out.stderr, out.stderr
    assert not (tmp_path / "repo").exists()
