"""A real tritonserver on a repository from configure_repository.py, and clients for the tests."""
from __future__ import annotations

import json
import queue
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc as grpcclient
from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers

from conftest import make_llama
from specinfer import SamplingParams, SpecInferEngine
from specinfer.proposers import DraftHead
from specinfer.serving.launcher import Server, start_server
from specinfer.tokenizer import TextTokenizer

ROOT = Path(__file__).resolve().parents[1]
MAX_BATCH = 8
PROMPTS = ["def main():", "import os\n", "class Foo(object):\n    ", "for i in range(10):", "x = [1, 2, 3]",
           "return None", "# comment: é ü 日本", "while True:\n"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<s>' + m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<s>assistant: ' }}{% endif %}")


def make_repository(root: Path, *options: str, dtype: str = "float32") -> tuple[Path, Path]:
    """Tiny LLM + tokenizer + two SSMs, and a repository for them, speculating at any batch size (more
    ``configure_repository.py`` ``options`` where given); returns (repository, LLM folder). ``dtype``
    is explicit: the default ``auto`` would make the tests depend on the machine's processor."""
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [p.read_text() for p in sorted(Path(json.__file__).parent.glob("*.py"))] + ["é ü 日本語 🙂"] * 3
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    vocab = tok.get_vocab_size()
    llm = make_llama(root / "llm", seed=60, vocab=vocab, max_position_embeddings=4096)
    TextTokenizer(tok, CHAT_TEMPLATE, {"eos_token": "</s>"}).save(llm)
    ssms = [make_llama(root / "ssm-close", seed=61, noise_from=llm, noise=0.25),
            make_llama(root / "ssm-other", seed=62, vocab=vocab, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)]
    torch.manual_seed(63)  # a draft head for it, untrained (its drafts are rarely accepted, but verified alike)
    DraftHead(64, 32, torch.arange(vocab)).save(root / "head")
    repo = root / "repo"
    subprocess.run([sys.executable, str(ROOT / "build_scripts" / "configure_repository.py"), "--llm", str(llm),
                    "--ssm", str(ssms[0]), "--ssm", str(ssms[1]), "--expansion", "1,2,1", "--output", str(repo),
                    *(["--head", str(root / "head")] if "--tensor-parallel" not in options else []),
                    "--max-batch-size", str(MAX_BATCH), "--dtype", dtype, "--max-speculative-batch", "0", *options],
                   check=True)  # every batch speculates: concurrent requests verify trees side by side
    return repo, llm


def serve(root: Path, *options: str):
    """Yields (server, engine, repository); the server must then stop cleanly."""
    repo, llm = make_repository(root, *options)
    server = start_server(repo, log_path=root / "server.log", exit_timeout=60)  # time to unload cleanly
    yield server, SpecInferEngine.from_pretrained(llm), repo
    code = server.stop(grace=120)  # a clean exit is asserted: no SIGKILL on a slow machine
    log = server.log_path.read_text()
    assert code == 0, log[-3000:]
    assert "successfully unloaded" in log and "specinfer_llm" in log


def expected(engine: SpecInferEngine, prompt: str, max_tokens: int) -> list[int]:
    params = SamplingParams(max_tokens=max_tokens)
    return engine.generate([prompt], params, speculate=False)[0].token_ids


def post(server: Server, path: str, body: dict | bytes) -> tuple[int, dict | str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{server.http_url}{path}", data=data, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            text = resp.read().decode()
            return resp.status, (json.loads(text) if path.endswith("/generate") else text)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read().decode())


def stream_events(server: Server, model: str, body: dict) -> list[dict]:
    status, text = post(server, f"/v2/models/{model}/generate_stream", {**body, "stream": True})
    assert status == 200, text
    return [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]


def ids(result: dict) -> list[int]:
    return np.array(result["output_ids"], dtype=np.int64).reshape(-1).tolist()


def grpc_inputs(prompt: str | list[int], max_tokens: int, **extra: np.ndarray) -> list:
    """A streamed request; a list prompt goes to a decoding model's own ``input_ids``. Every tensor
    gets the leading batch dimension of 1 (TensorRT-LLM's ``[1, 1]`` shapes)."""
    if isinstance(prompt, str):
        tensors = {"text_input": np.array([prompt.encode()], dtype=np.object_)}
    else:
        tensors = {"input_ids": np.array(prompt, dtype=np.int32), "stop_ids": np.zeros(0, np.int32)}
    tensors |= {"max_tokens": np.array([max_tokens], dtype=np.int32), "stream": np.array([True]), **extra}
    inputs = []
    for name, value in tensors.items():
        value = value[None]
        dtype = "BYTES" if value.dtype == np.object_ else grpcclient.np_to_triton_dtype(value.dtype)
        t = grpcclient.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        inputs.append(t)
    return inputs


def grpc_stream(server: Server, prompt: str | list[int], max_tokens: int, cancel_after: int | None = None,
                model: str = "specinfer") -> list[tuple[list[int], str | None]]:
    """Stream one request over gRPC; with ``cancel_after``, cancel it after that many responses."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer(model, grpc_inputs(prompt, max_tokens), enable_empty_final_response=True)
    chunks = []
    while True:
        result, error = results.get(timeout=120)
        assert error is None, error
        if result.as_numpy("output_ids") is not None:
            text = result.as_numpy("text_output")
            chunks.append((result.as_numpy("output_ids").reshape(-1).tolist(), None if text is None else text[0].decode()))
        if cancel_after is not None and len(chunks) >= cancel_after:
            client.stop_stream(cancel_requests=True)
            return chunks
        if result.get_response().parameters["triton_final_response"].bool_param:
            client.stop_stream()
            return chunks


def wait_for(predicate, timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


