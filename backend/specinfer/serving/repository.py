"""Write a Triton model repository: ``specinfer`` and ``incremental`` ensembles, their steps,
``specinfer_bls`` (the ``specinfer`` pipeline as a BLS model, which sees its client's cancellation) and
``specinfer_unary`` (the same BLS model, not decoupled: plain ``infer()`` and perf_analyzer without
``--streaming``).

``model_repository/`` in this project is exactly what ``write_repository`` produces with the
defaults (paths relative to the repository folder, pointing at ``engines/demo``);
``build_scripts/configure_repository.py`` writes one for other checkpoints.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import PROPOSERS, EngineConfig, SuffixConfig, TreeConfig
from .parameters import PARAMETERS, text
from .requests import Limits

COUNTERS = [("num_output_tokens", "TYPE_INT32"), ("num_llm_steps", "TYPE_INT32"),
            ("total_draft_tokens", "TYPE_INT32"), ("total_accepted_draft_tokens", "TYPE_INT32"),
            ("acceptance_rate", "TYPE_FP32")] + [(f"accepted_draft_tokens_{p}", "TYPE_INT32") for p in PROPOSERS]
# TensorRT-LLM's log-prob outputs ([batch, beam] and [batch, beam, tokens]) and perf metrics ([batch, 1])
LOG_PROBS = [("cum_log_probs", "TYPE_FP32", "1"), ("output_log_probs", "TYPE_FP32", "1, -1")]
PERF_METRICS = [(n, "TYPE_INT64", "1") for n in (
    "arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns",
    "kv_cache_alloc_new_blocks", "kv_cache_reused_blocks", "kv_cache_alloc_total_blocks")]
# decoding outputs that postprocessing passes on unchanged (its input: the name in capitals)
PASSED = [(n, t, "1") for n, t in COUNTERS] + LOG_PROBS + PERF_METRICS + [("sequence_index", "TYPE_INT32", "1")]
SAMPLING_INPUTS = [("stream", "TYPE_BOOL"), ("temperature", "TYPE_FP32"), ("top_k", "TYPE_INT32"),
                   ("top_p", "TYPE_FP32"), ("random_seed", "TYPE_UINT64"), ("end_id", "TYPE_INT32"),
                   ("min_length", "TYPE_INT32"), ("repetition_penalty", "TYPE_FP32"), ("presence_penalty", "TYPE_FP32"),
                   ("frequency_penalty", "TYPE_FP32"), ("return_log_probs", "TYPE_BOOL"),
                   ("num_return_sequences", "TYPE_INT32")]  # (the decoding model's own optional inputs)
# TensorRT-LLM's other optional inputs, settled by preprocessing (conventions.py)
CONVENTION_INPUTS = [("exclude_input_in_output", "TYPE_BOOL"), ("beam_width", "TYPE_INT32"),
                     ("pad_id", "TYPE_INT32"), ("return_context_logits", "TYPE_BOOL"), ("return_generation_logits", "TYPE_BOOL"),
                     ("return_perf_metrics", "TYPE_BOOL")]
# The pipeline both the ensemble and the BLS model run, as tensor names (one definition for both).
PRE_INPUTS = ["text_input", "max_tokens", "stop_words", "bad_words", "apply_chat_template", "stream"] + [
    n for n, _ in CONVENTION_INPUTS]
# the decoding model's inputs of the same names; it passes ``echo`` on to postprocessing (an ensemble step
# may not take inputs from a decoupled model and another model at once)
PRE_OUTPUTS = ["input_ids", "stop_ids", "bad_ids", "max_tokens", "echo"]
DECODE_OUTPUTS = ["output_ids", "context_ids", "echo"] + [n for n, _, _ in PASSED]
POST_INPUTS = {"TOKENS": "output_ids", "CONTEXT": "context_ids", "ECHO": "echo",  # postprocessing input <- decoding output
               **{n.upper(): n for n, _, _ in PASSED}}
# Every model takes a leading batch dimension of 1, as TensorRT-LLM's models do: its clients send
# [1, 1] shapes and Triton checks an input's rank against max_batch_size, so one model cannot take
# both [1] and [1, 1]. HTTP /generate and perf_analyzer add the batch dimension themselves; a request
# holding several prompts is refused by Triton ("batch-size must be <= 1"): send one per prompt.
MAX_BATCH = 1
CLIENT_OUTPUTS = ["text_output", "output_ids"] + [n for n, _, _ in PASSED]  # postprocessing's, as they are
ENTRY = {
    "preprocessing": "preprocessing_model",
    "postprocessing": "postprocessing_model",
    "specinfer_llm": "decoding_model",
    "incremental_llm": "decoding_model",
}


# Triton's Python stub embeds the interpreter ignoring the environment (sys.flags.ignore_environment),
# so PYTHONPATH would not reach the models: the entry point honours it itself.
ENTRY_POINT = '''"""Triton entry point; the model lives in specinfer.serving.{module}."""
import os
import sys

sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # torch's large buffers on huge pages; read before torch loads
from specinfer.serving.{module} import TritonPythonModel  # noqa: E402,F401
'''


@dataclass(frozen=True)
class RepositoryOptions:
    """What ``write_repository`` writes; a field named as a parameter of ``parameters.PARAMETERS`` is
    written as that parameter of both decoding models. Defaults that are the library's refer to it."""

    llm: str = "../engines/demo/llm"
    ssms: tuple[str, ...] = ()  # none: beside the draft head the demo SSMs added nothing (README, Benchmarks)
    head: str | None = "../engines/demo/head"  # the draft head's folder (proposers with "head")
    head_expansion: tuple[int, ...] = TreeConfig.head_expansion  # the head's tree: children per node at each level
    expansion: tuple[int, ...] = (1, 1)  # the largest adaptive tree: the demo SSMs match ~40% of tokens
    max_tree_tokens: int = TreeConfig.max_tree_tokens
    device: str = "cpu"
    dtype: str = "auto"  # bfloat16 where the processor computes it natively (and on CUDA), else float32
    max_batch_size: int = 16  # concurrent requests per decoding model; more wait in its queue
    max_context: int | None = 2048  # tokens per request (None: the LLM's max_position_embeddings, 8192 for
    # SmolLM2: 6 GB of KV cache per decoding model at 16 rows in fp32)
    draft_sampling: str = TreeConfig.draft_sampling
    verifier: str = "gumbel"  # seeded sampled requests reproduce at any load; same acceptance as MSS on selected trees
    adaptive: bool = True  # the expansion is the largest tree; each step verifies what pays off here
    proposers: tuple[str, ...] = ("suffix", "head")  # where draft nodes come from (TreeConfig.proposers)
    suffix_global_tokens: int = SuffixConfig.global_tokens  # earlier outputs the suffix proposer keeps for every request
    max_speculative_batch: int = 2  # larger steps decode plainly: on the 2-core CPU with the CPU kernels (tenth session)
    # a step's tree tokens cost arithmetic, and speculating at 4 lost (Triton 0.88x, closed batch 0.86x) where 2 gained 1.37x (README)
    attention: str | None = EngineConfig.attention  # "sdpa" | "triton"; None: the engine's default for the device
    cuda_graphs: bool | None = EngineConfig.cuda_graphs  # None: on with CUDA (and triton attention)
    tensor_parallel_size: int = EngineConfig.tensor_parallel_size  # processes each decoding model's LLM is sharded
    # over (workers started at load on the devices after ``device``, stopped at unload)
    ssm_engine: str = EngineConfig.ssm_engine  # "torch" | "onnxruntime" | "tensorrt": what runs the SSMs (runtimes/)
    offload: str = EngineConfig.offload  # "cpu": the LLM's decoder layers streamed from host memory (model/offload.py)
    bls_name: str = "specinfer_bls"  # TensorRT-LLM's clients know theirs as tensorrt_llm_bls
    unary_name: str = "specinfer_unary"  # the non-decoupled BLS model, for plain infer() (TensorRT-LLM's decoupled_mode: false)
    ensemble_name: str = "specinfer"  # TensorRT-LLM's clients and docs call theirs ensemble
    limits: Limits = field(default_factory=Limits)


def model_parameters(args: dict) -> dict[str, str]:
    """A Python model's ``config.pbtxt`` parameters, from the ``args`` Triton gives ``initialize``."""
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def tensor(name: str, dtype: str, dims: str, optional: bool = False) -> str:
    opt = " optional: true" if optional else ""
    return f'  {{ name: "{name}" data_type: {dtype} dims: [ {dims} ]{opt} }}'


def io(kind: str, tensors: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(tensors) + "\n]\n"


def parameters(values: dict[str, str]) -> str:
    return "".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in values.items())


def python_model(name: str, inputs: list[str], outputs: list[str], params: dict[str, str],
                 decoupled: bool = False, instances: int = 1) -> str:
    text = f'name: "{name}"\nbackend: "python"\nmax_batch_size: {MAX_BATCH}\n'
    if decoupled:
        text += "model_transaction_policy { decoupled: true }\n"
    text += io("input", inputs) + io("output", outputs)
    text += f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n"
    return text + parameters(params)


def decoding_config(name: str, opts: RepositoryOptions, speculate: bool) -> str:
    # input_ids and max_tokens are required, checked by name in the model (Triton 2.51 only counts)
    inputs = [tensor("input_ids", "TYPE_INT32", "-1", optional=True), tensor("stop_ids", "TYPE_INT32", "-1", optional=True),
              tensor("bad_ids", "TYPE_INT32", "-1", optional=True), tensor("max_tokens", "TYPE_INT32", "1", optional=True),
              tensor("echo", "TYPE_STRING", "1", optional=True)]
    inputs += [tensor(n, t, "1", optional=True) for n, t in SAMPLING_INPUTS]
    inputs += [tensor("stop", "TYPE_BOOL", "1", optional=True)]  # stop the request with this request id
    outputs = [tensor("output_ids", "TYPE_INT32", "-1"), tensor("context_ids", "TYPE_INT32", "-1"),
               tensor("echo", "TYPE_STRING", "1")]
    outputs += [tensor(n, t, d) for n, t, d in PASSED]
    values = {p.key: getattr(opts, p.key) for p in PARAMETERS if hasattr(opts, p.key)} | {"speculate": speculate}
    if not speculate:  # the incremental model: nothing to draft with
        values |= {"ssms": (), "adaptive": False, "proposers": (), "head": None}
    params = {p.key: text(values[p.key]) for p in PARAMETERS if p.key in values} | opts.limits.parameters()
    return python_model(name, inputs, outputs, params, decoupled=True)


def client_tensors() -> tuple[list[str], list[str]]:
    """Inputs and outputs of ``specinfer``, ``incremental`` and the BLS model. ``text_input`` and
    ``max_tokens`` are required but declared optional: Triton 2.51 checks only the number of inputs,
    and an ensemble never schedules a step whose required input is absent (the client would get no
    response at all), so preprocessing checks them by name and answers 400."""
    inputs = [tensor("text_input", "TYPE_STRING", "1", optional=True), tensor("max_tokens", "TYPE_INT32", "1", optional=True)]
    inputs += [tensor(n, t, "1", optional=True) for n, t in SAMPLING_INPUTS + CONVENTION_INPUTS]
    inputs += [tensor("stop_words", "TYPE_STRING", "-1", optional=True), tensor("bad_words", "TYPE_STRING", "-1", optional=True),
               tensor("apply_chat_template", "TYPE_BOOL", "1", optional=True)]
    outputs = [tensor("text_output", "TYPE_STRING", "-1"), tensor("output_ids", "TYPE_INT32", "-1")]
    outputs += [tensor(n, t, d) for n, t, d in PASSED]
    return inputs, outputs


def ensemble_config(name: str, decoder: str) -> str:
    def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
        ins = "".join(f'      input_map {{ key: "{k}" value: "{v}" }}\n' for k, v in inputs.items())
        outs = "".join(f'      output_map {{ key: "{k}" value: "{v}" }}\n' for k, v in outputs.items())
        return f'    {{\n      model_name: "{model}"\n      model_version: -1\n{ins}{outs}    }}'

    decode_in = {n: f"_{n}" for n in PRE_OUTPUTS} | {n: n for n, _ in SAMPLING_INPUTS}
    post_in = {k: f"_decoded_{v}" for k, v in POST_INPUTS.items()}
    steps = [
        step("preprocessing", {n: n for n in PRE_INPUTS}, {n: f"_{n}" for n in PRE_OUTPUTS}),
        step(decoder, decode_in, {n: f"_decoded_{n}" for n in DECODE_OUTPUTS}),
        step("postprocessing", post_in, {n: n for n in CLIENT_OUTPUTS}),
    ]
    inputs, outputs = client_tensors()
    text = f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {MAX_BATCH}\n' + io("input", inputs) + io("output", outputs)
    return text + "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n"


def repository_files(opts: RepositoryOptions) -> dict[str, str]:
    """Relative path -> content of every file of the repository."""
    tok = {"tokenizer_dir": opts.llm}
    pre = python_model(
        "preprocessing",
        [tensor("text_input", "TYPE_STRING", "1", optional=True), tensor("max_tokens", "TYPE_INT32", "1", optional=True),
         tensor("stop_words", "TYPE_STRING", "-1", optional=True), tensor("bad_words", "TYPE_STRING", "-1", optional=True),
         tensor("apply_chat_template", "TYPE_BOOL", "1", optional=True), tensor("stream", "TYPE_BOOL", "1", optional=True)]
        + [tensor(n, t, "1", optional=True) for n, t in CONVENTION_INPUTS],
        [tensor("input_ids", "TYPE_INT32", "-1"), tensor("stop_ids", "TYPE_INT32", "-1"),
         tensor("bad_ids", "TYPE_INT32", "-1"), tensor("max_tokens", "TYPE_INT32", "1"),
         tensor("echo", "TYPE_STRING", "1")], tok | opts.limits.parameters(), instances=2)
    post = python_model(
        "postprocessing",
        [tensor("TOKENS", "TYPE_INT32", "-1"), tensor("CONTEXT", "TYPE_INT32", "-1"), tensor("ECHO", "TYPE_STRING", "1")]
        + [tensor(n.upper(), t, d) for n, t, d in PASSED],
        [tensor("text_output", "TYPE_STRING", "-1"), tensor("output_ids", "TYPE_INT32", "-1")]
        + [tensor(n, t, d) for n, t, d in PASSED], tok)  # one instance: a stream's deltas stay in order
    files = {
        "preprocessing/config.pbtxt": pre,
        "postprocessing/config.pbtxt": post,
        "specinfer_llm/config.pbtxt": decoding_config("specinfer_llm", opts, speculate=True),
        "incremental_llm/config.pbtxt": decoding_config("incremental_llm", opts, speculate=False),
        f"{opts.ensemble_name}/config.pbtxt": ensemble_config(opts.ensemble_name, "specinfer_llm"),
        "incremental/config.pbtxt": ensemble_config("incremental", "incremental_llm"),
        f"{opts.bls_name}/config.pbtxt": python_model(opts.bls_name, *client_tensors(), {"decoder": "specinfer_llm"},
                                                      decoupled=True),
        f"{opts.unary_name}/config.pbtxt": python_model(opts.unary_name, *client_tensors(), {"decoder": "specinfer_llm"}),
        f"{opts.ensemble_name}/1/.gitkeep": "",
        "incremental/1/.gitkeep": "",
    }
    for model, module in (ENTRY | {opts.bls_name: "bls_model", opts.unary_name: "bls_model"}).items():
        files[f"{model}/1/model.py"] = ENTRY_POINT.format(module=module)
    return files


def write_repository(output: str | Path, opts: RepositoryOptions) -> Path:
    out = Path(output)
    for rel, content in repository_files(opts).items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return out
