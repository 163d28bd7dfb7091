"""The TensorRT adapter's bookkeeping, on CPU with a fake ``tensorrt`` module (TensorRT itself cannot run here).

The profiles must name every graph input with its rank and cover every shape the engine asks an SSM
for; the builder must receive them; the runtime adapter must pick the covering profile, set each
input's shape and bind each tensor (the runner's cache prefix, the preallocated outputs) by address.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import onnx
import pytest
import torch

from conftest import make_llama, prompts
from specinfer import TreeConfig
from specinfer.model import Transformer
from specinfer.runner import ModelRunner, chain_batch
from specinfer.runtimes.onnx_export import ensure_onnx, input_names, output_names
from specinfer.runtimes.tensorrt_model import TensorRTModel, build_plan, engine_profiles

TREE = TreeConfig(expansion=(1, 2, 3, 1))


class FakeProfile:
    def __init__(self) -> None:
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class FakeBuilder:
    def __init__(self, logger) -> None:
        self.config = SimpleNamespace(flags=[], profiles=[])
        self.config.set_flag = self.config.flags.append
        self.config.add_optimization_profile = self.config.profiles.append

    def create_network(self, flags):
        return SimpleNamespace()

    def create_builder_config(self):
        return self.config

    def create_optimization_profile(self):
        return FakeProfile()

    def build_serialized_network(self, network, config):
        return b"plan:" + json.dumps([p.shapes for p in config.profiles]).encode()


class FakeContext:
    def __init__(self) -> None:
        self.calls = []

    def set_optimization_profile_async(self, index, stream):
        self.calls.append(("profile", index))

    def set_input_shape(self, name, shape):
        self.calls.append(("shape", name, shape))

    def set_tensor_address(self, name, address):
        self.calls.append(("address", name, address))

    def execute_async_v3(self, stream):
        self.calls.append(("execute",))
        return True


class FakeEngine:
    def __init__(self, names, profiles) -> None:
        self.names, self.num_io_tensors, self.num_optimization_profiles = names, len(names), profiles
        self.context = FakeContext()

    def get_tensor_name(self, i):
        return self.names[i]

    def create_execution_context(self):
        return self.context


def fake_tensorrt(names, profiles):
    trt = SimpleNamespace(Logger=lambda level: None, Builder=FakeBuilder, BuilderFlag=SimpleNamespace(FP16="fp16", BF16="bf16"))
    trt.Logger.WARNING = 2
    trt.OnnxParser = lambda network, logger: SimpleNamespace(parse_from_file=lambda path: True, num_errors=0)
    trt.Runtime = lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda plan: FakeEngine(names, profiles))
    return trt


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    folder = make_llama(tmp_path_factory.mktemp("trt") / "ssm", seed=7)
    return ensure_onnx(folder, "float32", lambda: Transformer.from_pretrained(folder)), Transformer.from_pretrained(folder).args


def test_profiles_name_every_graph_input_with_its_rank_and_are_ordered(graph):
    path, args = graph
    ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in onnx.load(str(path)).graph.input}
    for profile in engine_profiles(rows=8, slots=300, max_context=171, tree=TREE):
        shapes = profile.shapes(args)
        assert set(shapes) == set(ranks) == set(input_names(args.num_hidden_layers))
        for name, (lo, opt, hi) in shapes.items():
            assert len(lo) == len(opt) == len(hi) == ranks[name]
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), (profile.name, name)


def test_profiles_cover_what_the_engine_asks_an_ssm_for():
    step, prefill = engine_profiles(rows=8, slots=300, max_context=171, tree=TREE)
    assert step.covers(8, 6, 300, 6)  # widest fed level: 1 * 2 * 3 = 6 nodes, logits at each, 8 requests
    assert step.covers(8, TREE.depth + 1, 300, 1)  # a catch-up chunk, logits at its last token
    assert not step.covers(8, 7, 300, 7) and not step.covers(9, 1, 300, 1)
    assert prefill.covers(8, 171, 300, 1) and not prefill.covers(1, 172, 300, 1)


def test_build_plan_gives_the_builder_every_profile_and_the_precision(graph, tmp_path):
    path, args = graph
    profiles = engine_profiles(rows=4, slots=200, max_context=64, tree=TREE)
    trt = fake_tensorrt([], 2)
    plan = build_plan(path, args, profiles, torch.float16, trt=trt)
    built = json.loads(plan.read_bytes().removeprefix(b"plan:"))
    assert built == [json.loads(json.dumps(p.shapes(args))) for p in profiles]
    assert plan.name == "model.float16.plan" and len(json.loads(plan.with_suffix(".json").read_text())) == 2


def test_runtime_binds_cache_prefix_and_outputs_by_address_under_the_covering_profile(graph):
    path, args = graph
    names = input_names(args.num_hidden_layers) + output_names(args.num_hidden_layers)
    profiles = engine_profiles(rows=4, slots=64, max_context=32, tree=TREE)
    model = TensorRTModel(path, profiles, args, torch.float32, "cpu", trt=fake_tensorrt(names, len(profiles)))
    runner = ModelRunner(model, rows=4, slots=64, attention=model.attention)
    chunks = prompts(2, seed=3, lo=9, hi=20)
    bound = {}

    def record(inputs, outputs):  # what the adapter hands TensorRT, checked against the tensors themselves
        bound.update({n: (tuple(t.shape), t.data_ptr()) for n, t in {**inputs, **outputs}.items()})
        TensorRTModel.run(model, inputs, outputs)

    model.run = record
    runner.forward([1, 3], [0, 0], chain_batch(chunks), output_index=torch.tensor([len(c) - 1 for c in chunks]))
    calls = model.context.calls
    t, w = max(map(len, chunks)), max(map(len, chunks)) + 1
    assert calls[0] == ("profile", 1)  # a prompt longer than a step's chunk: the prefill profile
    assert ("shape", "mask", (2, t, w)) in calls and ("shape", "logits_index", (2, 1)) in calls
    assert ("shape", "past_key_0", (2, w, args.num_key_value_heads, args.head_dim)) in calls
    assert {c[1] for c in calls if c[0] == "address"} == set(names)
    assert all(("address", n, ptr) in calls for n, (_, ptr) in bound.items())
    assert bound["logits"][0] == (2, 1, args.vocab_size) and bound["key_1"][0][:2] == (2, t)
    assert calls[-1] == ("execute",)
    model.context.calls.clear()
    runner.forward([1, 3], [len(c) for c in chunks], chain_batch([[5], [6]]))
    assert model.context.calls[0] == ("profile", 0)  # one token per row: the step profile
    with pytest.raises(ValueError, match="no TensorRT optimisation profile covers"):
        runner.forward([1, 3], [0, 0], chain_batch([[5] * 33, [6]]))


def test_a_plan_of_another_graph_is_refused(graph):
    path, args = graph
    profiles = engine_profiles(rows=4, slots=64, max_context=32, tree=TREE)
    with pytest.raises(ValueError, match="does not hold this model's graph"):
        TensorRTModel(path, profiles, args, torch.float32, "cpu", trt=fake_tensorrt(["tokens", "logits"], 2))
