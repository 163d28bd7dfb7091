"""NVIDIA's clients unchanged: the request shapes of TensorRT-LLM's end_to_end_grpc_client.py, the HTTP
payloads of its docs, perf_analyzer's LLM-guide input data, and plain infer() on the non-decoupled model."""
from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from served import PROMPTS, expected, post
from specinfer import SamplingParams
from specinfer.serving.launcher import server_env
from specinfer.serving.repository import RepositoryOptions, repository_files


def trtllm_inputs(prompt: str, output_len: int, streaming: bool, exclude_input_in_output: bool | None,
                  **optional) -> list:
    """What TensorRT-LLM's end_to_end_grpc_client.py ``prepare_inputs`` sends: every input [1, 1]
    (``bad_words`` / ``stop_words`` [1, n]), ``beam_width`` and ``temperature`` always (its default 1.0,
    no top_k / top_p)."""
    inputs = {"text_input": np.array([[prompt]]).astype(object),
              "max_tokens": np.ones_like([[prompt]]).astype(np.int32) * output_len,
              "stream": np.array([[streaming]], dtype=bool), "beam_width": np.array([[1]], dtype=np.int32),
              "temperature": np.array([[optional.pop("temperature", 1.0)]], dtype=np.float32),
              "num_return_sequences": np.array([[optional.pop("num_return_sequences", 1)]], dtype=np.int32)}
    if "top_k" in optional:
        inputs["top_k"] = np.array([[optional.pop("top_k")]], dtype=np.int32)
    if "random_seed" in optional:
        inputs["random_seed"] = np.array([[optional.pop("random_seed")]], dtype=np.uint64)
    for name in ("bad_words", "stop_words"):
        if optional.get(name):
            inputs[name] = np.array([optional.pop(name)], dtype=object)
    for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
        if name in optional:
            inputs[name] = np.array([[optional.pop(name)]], dtype=np.float32)
    for name in ("end_id", "pad_id"):
        if name in optional:
            inputs[name] = np.array([[optional.pop(name)]], dtype=np.int32)
    for name in ("return_log_probs", "return_perf_metrics"):
        if optional.pop(name, False):
            inputs[name] = np.array([[True]], dtype=bool)
    assert not optional, optional
    if exclude_input_in_output is not None:
        inputs["exclude_input_in_output"] = np.array([[exclude_input_in_output]], dtype=bool)
    tensors = []
    for name, value in inputs.items():
        t = grpcclient.InferInput(name, value.shape, "BYTES" if value.dtype == object else grpcclient.np_to_triton_dtype(value.dtype))
        t.set_data_from_numpy(value)
        tensors.append(t)
    return tensors


PERF_OUTPUTS = ["kv_cache_alloc_new_blocks", "kv_cache_reused_blocks", "kv_cache_alloc_total_blocks", "arrival_time_ns",
                "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns", "acceptance_rate",
                "total_accepted_draft_tokens", "total_draft_tokens"]  # what the script asks for, in its order


def trtllm_results(server, model: str, prompt: str, streaming: bool, outputs: list[str], **kwargs) -> list:
    """The client's ``run_inference``: one gRPC stream asking for ``outputs``; its responses."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put(error if error else result))
    client.async_stream_infer(model, trtllm_inputs(prompt, 16, streaming, **kwargs),
                              outputs=[grpcclient.InferRequestedOutput(n) for n in outputs])
    client.stop_stream()
    responses = []
    while not results.empty():
        result = results.get()
        assert not isinstance(result, Exception), result
        responses.append(result)
    return responses


def trtllm_run(server, model: str, prompt: str, streaming: bool, **kwargs) -> str:
    """Its text_output values appended (streaming) or the last one kept, as the script reads them
    (``output[0].decode``)."""
    text = ""
    for result in trtllm_results(server, model, prompt, streaming, ["text_output"], **kwargs):
        out = result.as_numpy("text_output")[0].decode("utf-8")
        text = text + out if streaming else out
    return text


@pytest.mark.parametrize("model", ["specinfer", "specinfer_bls", "incremental"])
@pytest.mark.parametrize("streaming, exclude, echo", [(False, False, True), (False, True, False), (False, None, True),
                                                     (True, False, False), (True, True, False)])
def test_end_to_end_grpc_client_gets_greedy_text_and_echo(served, model, streaming, exclude, echo):
    server, engine, _ = served
    prompt = PROMPTS[1]
    want = engine.tokenizer.decode(expected(engine, prompt, 16))  # temperature 1.0 alone: greedy
    got = trtllm_run(server, model, prompt, streaming, exclude_input_in_output=exclude)
    assert got == (prompt + want if echo else want)  # the script's --check-outputs rule


def test_end_to_end_grpc_client_penalties_and_bad_words(served):
    server, engine, _ = served
    prompt = PROMPTS[0]
    plain = expected(engine, prompt, 16)
    bad = engine.tokenizer.decode(plain[2:3])  # a word the plain output holds
    bad_ids = tuple(engine.tokenizer.encode(bad))
    params = SamplingParams(max_tokens=16, bad_sequences=[bad_ids], repetition_penalty=1.5, presence_penalty=0.3,
                            frequency_penalty=0.2)
    want = engine.generate([prompt], params, speculate=False)[0].token_ids
    assert want != plain
    got = trtllm_run(server, "specinfer", prompt, False, exclude_input_in_output=True, bad_words=[bad],
                     stop_words=[""], repetition_penalty=1.5, presence_penalty=0.3, frequency_penalty=0.2,
                     pad_id=2, end_id=2)
    assert got == engine.tokenizer.decode(want)
    assert all(want[i:i + len(bad_ids)] != list(bad_ids) for i in range(len(want)))


@pytest.mark.parametrize("model, streaming", [("specinfer", False), ("specinfer_bls", True)])
def test_log_probs_and_perf_metrics_in_tensorrt_llm_shapes(served, model, streaming):
    server, engine, _ = served
    prompt = PROMPTS[3]
    want = engine.generate([prompt], SamplingParams(max_tokens=16, log_probs=True), speculate=False)[0]
    responses = trtllm_results(server, model, prompt, streaming, ["text_output", "cum_log_probs", "output_log_probs"]
                               + PERF_OUTPUTS, exclude_input_in_output=True, return_log_probs=True,
                               return_perf_metrics=True)
    assert len(responses) > 1 if streaming else len(responses) == 1
    got = np.concatenate([r.as_numpy("output_log_probs") for r in responses], axis=2)
    assert got.shape == (1, 1, 16)
    assert np.allclose(got[0, 0], want.log_probs, atol=1e-4)
    last = responses[-1]
    assert last.as_numpy("cum_log_probs").shape == (1, 1)
    assert abs(last.as_numpy("cum_log_probs")[0][0] - sum(want.log_probs)) < 1e-3
    perf = {n: last.as_numpy(n)[0][0] for n in PERF_OUTPUTS}  # the script reads each as [0][0]
    assert 0 < perf["arrival_time_ns"] <= perf["first_scheduled_time_ns"] <= perf["first_token_time_ns"] \
        <= perf["last_token_time_ns"]
    assert (perf["kv_cache_alloc_new_blocks"], perf["kv_cache_reused_blocks"], perf["kv_cache_alloc_total_blocks"]) == (1, 0, 1)
    assert 0 < perf["total_draft_tokens"] and 0 <= perf["acceptance_rate"] <= 1
    assert perf["total_accepted_draft_tokens"] == round(perf["acceptance_rate"] * perf["total_draft_tokens"])


@pytest.mark.parametrize("model", ["specinfer", "specinfer_bls"])
def test_num_return_sequences(served, model):
    """``-n``: n independent sequences, each response naming its ``sequence_index`` ([1, 1])."""
    server, engine, _ = served
    prompt = PROMPTS[4]
    greedy = prompt + engine.tokenizer.decode(expected(engine, prompt, 16))
    responses = trtllm_results(server, model, prompt, False, ["text_output", "sequence_index"],
                               exclude_input_in_output=False, num_return_sequences=2)
    texts = {int(r.as_numpy("sequence_index")[0][0]): r.as_numpy("text_output")[0].decode() for r in responses}
    assert texts == {0: greedy, 1: greedy}  # greedy: the same text twice, as TensorRT-LLM gives
    sampled: dict[int, str] = {}
    for r in trtllm_results(server, model, prompt, True, ["text_output", "sequence_index"], exclude_input_in_output=False,
                            num_return_sequences=3, temperature=1.0, top_k=50, random_seed=5):
        i = int(r.as_numpy("sequence_index")[0][0])
        sampled[i] = sampled.get(i, "") + r.as_numpy("text_output")[0].decode()
    assert sorted(sampled) == [0, 1, 2] and len(set(sampled.values())) > 1  # independent draws
    status, out = post(server, "/v2/models/specinfer_unary/generate",
                       {"text_input": "hi", "max_tokens": 4, "num_return_sequences": 2})
    assert status == 400 and "num_return_sequences 2 needs a decoupled model" in out["error"], out


@pytest.mark.parametrize("name, value, message", [
    ("beam_width", 2, "beam_width 2 is not supported"),
    ("num_return_sequences", 0, "num_return_sequences must be in [1, 8]"),
    ("return_context_logits", True, "return_context_logits is not supported"),
    ("return_generation_logits", True, "return_generation_logits is not supported"),
])
def test_unimplemented_values_are_refused_by_name(served, name, value, message):
    server, _, _ = served
    status, out = post(server, "/v2/models/specinfer/generate", {"text_input": "hi", "max_tokens": 4, name: value})
    assert status == 400 and message in out["error"], out


def test_http_payloads_of_tensorrt_llm_docs(served):
    server, engine, _ = served
    prompt = PROMPTS[2]
    want = engine.tokenizer.decode(expected(engine, prompt, 20))
    for body in ({"text_input": prompt, "max_tokens": 20, "bad_words": "", "stop_words": ""},
                 {"text_input": prompt, "max_tokens": 20, "bad_words": [""], "stop_words": [""], "pad_id": 2,
                  "end_id": 2, "temperature": 0.7}):
        status, out = post(server, "/v2/models/specinfer/generate", body)
        assert status == 200, out
        assert out["text_output"] == prompt + want
    plain = expected(engine, prompt, 20)
    words = [engine.tokenizer.decode([t]) for t in plain]  # tokens that are whole words (the tiny model writes bytes)
    bad = [w for w, t in zip(words, plain) if engine.tokenizer.encode(w) == [t]][:2]
    assert len(bad) == 2
    status, out = post(server, "/v2/models/specinfer/generate",
                       {"text_input": prompt, "max_tokens": 20, "bad_words": bad, "exclude_input_in_output": True})
    assert status == 200, out
    want = engine.generate([prompt], SamplingParams(
        max_tokens=20, bad_sequences=[tuple(engine.tokenizer.encode(b)) for b in bad]), speculate=False)[0]
    assert want.token_ids != plain, (bad, plain)
    assert out["text_output"] == want.text, (out, want.text)


def test_plain_infer_on_the_non_decoupled_model(served):
    """gRPC and HTTP unary infer() reach specinfer_unary; concurrent ones share LLM forwards."""
    server, engine, _ = served
    before = server.metrics()
    results: dict[int, str] = {}

    def run(i: int) -> None:
        prompt = PROMPTS[i]
        if i % 2:
            client = grpcclient.InferenceServerClient(server.grpc_url)
            result = client.infer("specinfer_unary", trtllm_inputs(prompt, 16, False, exclude_input_in_output=False))
        else:
            client = httpclient.InferenceServerClient(server.http_url)
            inputs = []
            for name, value in (("text_input", np.array([[prompt.encode()]], dtype=object)),
                                ("max_tokens", np.array([[16]], dtype=np.int32))):
                t = httpclient.InferInput(name, list(value.shape), "BYTES" if value.dtype == object else "INT32")
                t.set_data_from_numpy(value)
                inputs.append(t)
            result = client.infer("specinfer_unary", inputs)
        results[i] = result.as_numpy("text_output")[0].decode()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(6):
        assert results[i] == PROMPTS[i] + engine.tokenizer.decode(expected(engine, PROMPTS[i], 16)), i
    after = server.metrics()
    key = '{model="specinfer_llm"}'
    forwards = after["specinfer_llm_forwards" + key] - before["specinfer_llm_forwards" + key]
    verified = after["specinfer_llm_forward_requests" + key] - before["specinfer_llm_forward_requests" + key]
    assert verified / forwards > 1.5, f"mean requests per LLM forward {verified / forwards:.2f}"
    status, out = post(server, "/v2/models/specinfer_unary/generate", {"text_input": "hi", "max_tokens": 4, "stream": True})
    assert status == 400 and "stream=true needs a decoupled model" in out["error"], out


@pytest.mark.parametrize("model, streaming", [("specinfer", True), ("specinfer_unary", False)])
def test_perf_analyzer_llm_guide_input_data(served, tmp_path, model, streaming):
    server, _, _ = served
    data = tmp_path / "input.json"
    data.write_text(json.dumps({"data": [{"text_input": [p], "stream": [streaming], "max_tokens": [8],
                                          "bad_words": [""], "stop_words": [""]} for p in PROMPTS[:3]]}))
    cmd = [str(Path(sys.executable).parent / "perf_analyzer"), "-m", model, "-u", server.grpc_url, "-i", "grpc",
           "--async", "--input-data", str(data), "--shape=text_input:1", "--shape=max_tokens:1",
           "--shape=bad_words:1", "--shape=stop_words:1", "--measurement-mode=count_windows",
           "--measurement-request-count=4", "--concurrency-range=2", "--stability-percentage=999",
           ] + (["--streaming"] if streaming else [])
    run = subprocess.run(cmd, capture_output=True, text=True, env=server_env(), timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "Concurrency: 2" in run.stdout


def test_tensorrt_llm_model_names():
    files = repository_files(RepositoryOptions(ensemble_name="ensemble", bls_name="tensorrt_llm_bls"))
    assert 'name: "ensemble"\nplatform: "ensemble"' in files["ensemble/config.pbtxt"]
    assert "specinfer/config.pbtxt" not in files and "tensorrt_llm_bls/1/model.py" in files
    assert "decoupled: true" in files["tensorrt_llm_bls/config.pbtxt"]
    assert "decoupled" not in files["specinfer_unary/config.pbtxt"]
