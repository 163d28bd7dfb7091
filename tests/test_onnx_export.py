"""The exported ONNX graph (run by ONNX Runtime behind ModelRunner) equals the PyTorch model."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import VOCAB, make_llama
from specinfer.model import Transformer
from specinfer.runner import ModelRunner, NodeBatch, chain_batch
from specinfer.runtimes.onnx_export import compiled_dir, ensure_onnx
from specinfer.runtimes.onnxruntime_model import OnnxRuntimeModel, providers_for
from specinfer.tree import pad_trees
from test_tree_attention import random_tree

TOL = 1e-4
CONFIGS = {
    "gqa": {},
    "mha-tied-bias": dict(num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
}


def runners(folder):
    """A PyTorch runner and an ONNX Runtime runner of the same checkpoint."""
    graph = ensure_onnx(folder, "float32", lambda: Transformer.from_pretrained(folder))
    model = Transformer.from_pretrained(folder)
    compiled = OnnxRuntimeModel(graph, model.args, torch.float32, "cpu")
    return ModelRunner(model, rows=6, slots=96), ModelRunner(compiled, rows=6, slots=96, attention=compiled.attention)


def assert_close(a: torch.Tensor, b: torch.Tensor, real: torch.Tensor | None = None) -> None:
    """``real``: compare only those tokens (the PyTorch runner skips padding; its logits are zeros there)."""
    assert a.shape == b.shape
    if real is not None:
        a, b = a[real], b[real]
    assert (a - b).abs().max().item() < TOL


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("rows", [[4, 0, 2], [1, 2, 3]])  # an index tensor; a slice (consecutive rows)
def test_graph_equals_pytorch_on_prefill_decode_and_trees(tmp_path, config, rows):
    folder = make_llama(tmp_path / config, seed=3, **CONFIGS[config])
    torch_runner, ort_runner = runners(folder)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (1, 9, 23)]
    last = torch.tensor([len(p) - 1 for p in prompts])
    for output_index in (last, None):  # prefill: last logits only, then every token's
        for r in (torch_runner, ort_runner):
            r.forward(rows, [0] * 3, chain_batch(prompts), output_index=output_index)
        assert_close(*(r.forward(rows, [0] * 3, chain_batch(prompts), output_index=output_index)
                       for r in (torch_runner, ort_runner)), None if output_index is not None else chain_batch(prompts).valid)
    lengths = [len(p) for p in prompts]
    decode = chain_batch([[int(t)] for t in torch.randint(3, VOCAB, (3,), generator=g)])
    assert_close(*(r.forward(rows, lengths, decode) for r in (torch_runner, ort_runner)))
    for r in (torch_runner, ort_runner):
        r.commit(rows, torch.tensor(lengths), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, dtype=torch.long))
    lengths = [n + 1 for n in lengths]
    batch = pad_trees([random_tree(n, g) for n in (7, 1, 12)])  # padded: different tree sizes
    b, n = batch.tokens.shape
    nodes = NodeBatch(batch.tokens, torch.arange(n).expand(b, n), batch.depths, batch.ancestors, batch.valid)
    assert_close(*(r.forward(rows, lengths, nodes) for r in (torch_runner, ort_runner)), batch.valid)
    for layer in range(torch_runner.model.args.num_hidden_layers):  # every real K/V the graph returned
        for row, length, valid in zip(rows, lengths, batch.valid):
            width = length + int(valid.sum())
            assert_close(torch_runner.cache.k[layer][row, :width], ort_runner.cache.k[layer][row, :width])
            assert_close(torch_runner.cache.v[layer][row, :width], ort_runner.cache.v[layer][row, :width])


def test_export_is_reused_until_the_checkpoint_changes(tmp_path):
    folder = make_llama(tmp_path / "m", seed=4)
    exports = []

    def load():
        exports.append(1)
        return Transformer.from_pretrained(folder)

    graph = ensure_onnx(folder, "float32", load)
    assert graph.parent == compiled_dir(folder, "float32") and graph.is_file()
    assert ensure_onnx(folder, "float32", load) == graph and len(exports) == 1
    weights = folder / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    ensure_onnx(folder, "float32", load)
    assert len(exports) == 2
    assert json.loads((graph.parent / "engine.json").read_text())["dtype"] == "float32"


def test_bad_settings_are_refused(tmp_path):
    folder = make_llama(tmp_path / "m", seed=4)
    graph = ensure_onnx(folder, "float32", lambda: Transformer.from_pretrained(folder))
    args = Transformer.from_pretrained(folder).args
    with pytest.raises(ValueError, match="float32 on the CPU"):
        OnnxRuntimeModel(graph, args, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="onnxruntime-gpu"):
        providers_for(torch.device("cuda"), ["CPUExecutionProvider"])
    assert providers_for(torch.device("cuda"), ["CPUExecutionProvider", "CUDAExecutionProvider"]) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_onnxruntime_cuda_provider_gives_the_torch_ssms_tokens(models):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA execution provider (onnxruntime-gpu)")
    from specinfer import SamplingParams, SpecInferEngine, TreeConfig
    from conftest import prompts

    batch, params = prompts(8, seed=4), SamplingParams(max_tokens=8, ignore_eos=True)
    outs = [[r.token_ids for r in SpecInferEngine.from_pretrained(
        models["llm"], [models["close"]], tree=TreeConfig(expansion=(1, 2, 1)), device="cuda", ssm_engine=kind,
        max_batch_size=8).generate(batch, params)] for kind in ("torch", "onnxruntime")]
    assert outs[0] == outs[1]
