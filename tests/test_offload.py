"""Offloading (``model/offload.py``): the decoder layers streamed from host memory compute what the
resident model computes, layer for layer; the engine's output does not change.

On CPU the buffers are host tensors and each copy is done before its layer is handed out, so the
bookkeeping (which layer is in which buffer, copies per forward, the prefetch of the next layer) is
checked here; the gpu-marked tests check the same with pinned host memory, a side stream and events.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_llama, prompts
from specinfer import EngineConfig, SamplingParams, SpecInferEngine, TreeConfig
from specinfer.cost_model import FixedCosts
from specinfer.model import Transformer
from specinfer.parallel.layers import Shard
from specinfer.runner import ModelRunner, chain_batch
from specinfer.serving.repository import RepositoryOptions, decoding_config

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = prompts(12, seed=31)
PARAMS = [SamplingParams(max_tokens=5 + (i * 5) % 13, ignore_eos=True) for i in range(len(PROMPTS))]
TREES = {"chain": TreeConfig(expansion=(1, 1, 1, 1)), "tree": TreeConfig(expansion=(1, 1, 3, 1)),
         "adaptive": TreeConfig(expansion=(2, 2, 1), adaptive=True)}


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> Path:
    """Three layers: more layers than buffers, so buffer 0 is reused within a forward."""
    return make_llama(tmp_path_factory.mktemp("deep") / "llm", seed=4, num_hidden_layers=3)


@pytest.fixture(scope="module")
def reference(models) -> list[list[int]]:
    engine = SpecInferEngine.from_pretrained(models["llm"], max_batch_size=8)
    return [r.token_ids for r in engine.generate(PROMPTS, PARAMS, speculate=False)]


def streamed_forward(model: Transformer, chunks: list[list[int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of a prefill of ``chunks`` and every layer's K cache."""
    runner = ModelRunner(model, len(chunks), 64)
    logits = runner.forward(list(range(len(chunks))), [0] * len(chunks), chain_batch(chunks), prompt=True)
    return logits, runner.cache.k


def test_streamed_forward_equals_resident_layer_for_layer(deep):
    resident = Transformer.from_pretrained(deep)
    model = Transformer.from_pretrained(deep, offload="cpu")
    streamer = model.streamer
    layers = resident.args.num_hidden_layers
    assert len(streamer.buffers) == 2 < layers
    seen = []

    def check(buffer, args):
        i = buffer.self_attn.layer
        assert streamer.buffers[i % 2] is buffer and streamer.held[i % 2] == i
        assert all(torch.equal(h, w) for h, w in zip(buffer.parameters(), resident.model.layers[i].parameters()))
        if i + 1 < layers:  # the next layer is already in the other buffer (on CUDA: being copied in)
            other = streamer.buffers[(i + 1) % 2]
            assert streamer.held[(i + 1) % 2] == i + 1
            assert all(torch.equal(h, w) for h, w in zip(other.parameters(), resident.model.layers[i + 1].parameters()))
        seen.append(i)

    for buffer in streamer.buffers:
        buffer.register_forward_pre_hook(check)
    chunks = prompts(3, seed=2)
    logits, k = streamed_forward(model, chunks)
    assert seen == list(range(layers))  # every layer computed once, in order, from its own weights
    assert streamer.copies == layers and streamer.held == [2, 1]
    expected, expected_k = streamed_forward(resident, chunks)
    assert torch.equal(logits, expected)
    assert all(torch.equal(a, b) for a, b in zip(k, expected_k))  # each buffer wrote its own layer's cache
    streamed_forward(model, chunks)
    assert streamer.copies == 2 * layers and seen == list(range(layers)) * 2


def test_host_layers_stay_the_weights_and_the_rest_is_resident(deep):
    model = Transformer.from_pretrained(deep, offload="cpu")
    host = [p for layer in model.model.layers for p in layer.parameters()]
    buffers = {p.data_ptr() for b in model.streamer.buffers for p in b.parameters()}
    assert not buffers & {p.data_ptr() for p in host}  # the buffers are copies, never the host weights
    assert model.new_cache(1, 8).k[0].device == model.lm_head.weight.device
    model.batch_invariant(False)
    assert not any(m.invariant for m in model.streamer.modules() if hasattr(m, "invariant"))
    model.batch_invariant(True)
    assert all(m.invariant for m in model.streamer.modules() if hasattr(m, "invariant"))


def test_offload_incremental_equals_resident(models, reference):
    engine = SpecInferEngine.from_pretrained(models["llm"], max_batch_size=8, offload="cpu")
    assert [r.token_ids for r in engine.generate(PROMPTS, PARAMS, speculate=False)] == reference
    streamer = engine.llm.model.streamer
    assert streamer.copies > 0 and streamer.copies % engine.llm.model.args.num_hidden_layers == 0


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("tree", sorted(TREES))
def test_offload_speculative_equals_resident(models, reference, tree, batch):
    engine = SpecInferEngine.from_pretrained(models["llm"], [models["close"]], tree=TREES[tree], max_batch_size=batch,
                                             offload="cpu")
    if TREES[tree].adaptive:  # an offloaded forward costs the weights' copy whatever it feeds (what a GPU shows)
        engine.llm.costs, engine.ssms[0].costs = FixedCosts(lambda n: 1.0), FixedCosts(lambda n: 0.01)
    results = engine.generate(PROMPTS, PARAMS)
    assert [r.token_ids for r in results] == reference
    assert sum(r.accepted_draft_tokens for r in results) > 0  # trees were verified, not only roots


@pytest.mark.parametrize("verifier", ["mss", "gumbel"])
def test_offload_sampled_output_is_unchanged_for_a_seed(models, verifier):
    tree = TreeConfig(expansion=(1, 2, 1), verifier=verifier)
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i, max_tokens=12, ignore_eos=True)
              for i in range(6)]
    runs = [SpecInferEngine.from_pretrained(models["llm"], [models["close"]], tree=tree, max_batch_size=4, offload=o)
            .generate(PROMPTS[:6], params) for o in ("none", "cpu")]
    resident, offloaded = ([r.token_ids for r in run] for run in runs)
    assert offloaded == resident
    assert len({tuple(t) for t in resident}) > 1


def test_demo_llm_offloaded_equals_resident():
    llm, ssm = ROOT / "engines/demo/llm", ROOT / "engines/demo/ssm-a"
    if not (llm / "model.safetensors").is_file():
        pytest.skip("the demo LLM is not in engines/demo/llm")
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    prompt = "The capital of France is"
    expected = SpecInferEngine.from_pretrained(llm, max_batch_size=1).generate([prompt], params, speculate=False)[0]
    engine = SpecInferEngine.from_pretrained(llm, [ssm], tree=TreeConfig(expansion=(1, 1)), max_batch_size=1, offload="cpu")
    assert engine.generate([prompt], params)[0].token_ids == expected.token_ids
    assert engine.llm.model.streamer.copies % engine.llm.model.args.num_hidden_layers == 0


def test_bad_offload_values_are_refused(models):
    with pytest.raises(ValueError, match="offload must be one of"):
        EngineConfig(offload="disk")
    with pytest.raises(ValueError, match="offload must be one of"):
        Transformer.from_pretrained(models["llm"], offload="gpu")
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        EngineConfig(offload="cpu", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor-parallel shard"):
        Transformer.from_pretrained(models["llm"], shard=Shard(comm=None), offload="cpu")
    with pytest.raises(ValueError, match="cuda_graphs"):
        EngineConfig(offload="cpu", device="cuda", cuda_graphs=True)
    assert EngineConfig(offload="cpu", device="cuda").cuda_graphs is False  # the default turns graphs off
    with pytest.raises(ValueError, match="offload must be one of"):
        SpecInferEngine.from_pretrained(models["llm"], offload="yes")


def test_repository_parameter_offload():
    assert 'parameters { key: "offload" value: { string_value: "none" } }' in decoding_config(
        "specinfer_llm", RepositoryOptions(), speculate=True)
    text = decoding_config("specinfer_llm", RepositoryOptions(offload="cpu"), speculate=True)
    assert 'parameters { key: "offload" value: { string_value: "cpu" } }' in text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_streamed_forward_equals_resident(deep):
    resident = Transformer.from_pretrained(deep, device="cuda")
    model = Transformer.from_pretrained(deep, device="cuda", offload="cpu")
    streamer = model.streamer
    assert all(p.device.type == "cpu" and p.is_pinned() for p in model.model.layers.parameters())
    assert all(p.device.type == "cuda" for b in streamer.buffers for p in b.parameters())
    assert model.lm_head.weight.device.type == "cuda"
    chunks = prompts(3, seed=2)
    for run in range(1, 4):  # later forwards wait on the previous forward's buffer events
        logits, k = streamed_forward(model, chunks)
        assert streamer.copies == run * resident.args.num_hidden_layers
        expected, expected_k = streamed_forward(resident, chunks)
        assert torch.equal(logits, expected)
        assert all(torch.equal(a, b) for a, b in zip(k, expected_k))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("batch", [1, 8])
def test_cuda_offload_speculative_equals_resident(models, batch):
    kwargs = dict(device="cuda", dtype="bfloat16", max_batch_size=batch, tree=TREES["tree"])
    resident = SpecInferEngine.from_pretrained(models["llm"], **kwargs)
    expected = [r.token_ids for r in resident.generate(PROMPTS, PARAMS, speculate=False)]
    engine = SpecInferEngine.from_pretrained(models["llm"], [models["close"]], offload="cpu", **kwargs)
    assert [r.token_ids for r in engine.generate(PROMPTS, PARAMS, speculate=False)] == expected
    assert [r.token_ids for r in engine.generate(PROMPTS, PARAMS)] == expected
