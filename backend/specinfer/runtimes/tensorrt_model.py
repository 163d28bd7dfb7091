"""A TensorRT engine built from the exported ONNX graph, run behind ``ModelRunner``.

UNVERIFIED: TensorRT cannot be installed on any machine of this project, so this adapter has never run
against the real library. It is kept thin: ``build_plan`` parses the graph with TensorRT's ONNX parser
and builds one optimisation profile per kind of SSM forward (``engine_profiles``); ``TensorRTModel``
picks the profile that covers a call's shapes, sets the input shapes and binds every tensor by address
(``execute_async_v3`` on torch's current CUDA stream). What it consumes (the graph, the profiles, the
shape and address bookkeeping) is tested on CPU with a fake ``tensorrt`` module.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import torch

from ..model.checkpoint import ModelArgs
from ..config import TreeConfig
from .base import CompiledModel
from .onnx_export import cache_names

Range = tuple[int, int, int]  # min, opt, max
PRECISION_FLAGS = {torch.float16: "FP16", torch.bfloat16: "BF16"}


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: the (min, opt, max) of the graph's dynamic dimensions."""

    name: str
    batch: Range
    tokens: Range
    width: Range
    outputs: Range  # G: tokens whose logits are returned

    def covers(self, batch: int, tokens: int, width: int, outputs: int) -> bool:
        dims = zip((self.batch, self.tokens, self.width, self.outputs), (batch, tokens, width, outputs))
        return all(lo <= n <= hi for (lo, _, hi), n in dims)

    def shapes(self, args: ModelArgs) -> dict[str, tuple[tuple[int, ...], ...]]:
        """Per graph input, its (min, opt, max) shapes."""
        b, t, w, g = self.batch, self.tokens, self.width, self.outputs
        kv = (args.num_key_value_heads, args.head_dim)
        shapes = {name: tuple((b[i], t[i]) for i in range(3)) for name in ("tokens", "positions", "slots")}
        shapes["mask"] = tuple((b[i], t[i], w[i]) for i in range(3))
        shapes["logits_index"] = tuple((b[i], g[i]) for i in range(3))
        for name in cache_names(args.num_hidden_layers, ("past_key", "past_value")):
            shapes[name] = tuple((b[i], w[i], *kv) for i in range(3))
        return shapes


def engine_profiles(rows: int, slots: int, max_context: int, tree: TreeConfig) -> list[Profile]:
    """The shapes an engine of this capacity asks an SSM for.

    ``step``: every speculation step, batched over up to ``rows`` requests: a catch-up chunk (the
    accepted tokens the SSM did not propose plus the new root, at most depth + 1, logits at one) or
    one fed tree level (its widest is the largest product of leading expansion widths before the last
    level, which is never fed). ``prefill``: the prompts of newly admitted requests, up to the context.
    """
    widths = [1]
    for k in tree.expansion[:-1]:
        widths.append(widths[-1] * k)
    step = max(max(widths), tree.depth + 1)
    opt_width = min(slots, 512)
    return [
        Profile("step", (1, rows, rows), (1, 1, step), (1, opt_width, slots), (1, 1, step)),
        Profile("prefill", (1, 1, rows), (1, min(128, max_context), max_context), (1, opt_width, slots), (1, 1, 1)),
    ]


def import_tensorrt() -> ModuleType:
    try:
        import tensorrt
    except ImportError as exc:
        raise ValueError("ssm_engine='tensorrt' needs NVIDIA's tensorrt Python package on a CUDA machine") from exc
    return tensorrt


def plan_path(graph: Path, dtype: torch.dtype) -> Path:
    return graph.with_name(f"model.{str(dtype).removeprefix('torch.')}.plan")


def build_plan(graph: Path, args: ModelArgs, profiles: list[Profile], dtype: torch.dtype,
               trt: ModuleType | None = None) -> Path:
    """Build and write a TensorRT plan from ``graph``; its profiles go to ``<plan>.json``."""
    trt = trt or import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT cannot parse {graph}: {errors}")
    config = builder.create_builder_config()
    if dtype in PRECISION_FLAGS:
        config.set_flag(getattr(trt.BuilderFlag, PRECISION_FLAGS[dtype]))
    for profile in profiles:
        opt = builder.create_optimization_profile()
        for name, (lo, mid, hi) in profile.shapes(args).items():
            opt.set_shape(name, lo, mid, hi)
        config.add_optimization_profile(opt)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT could not build an engine from {graph} (see its log above)")
    path = plan_path(graph, dtype)
    path.write_bytes(bytes(plan))
    path.with_suffix(".json").write_text(json.dumps([asdict(p) for p in profiles], indent=1) + "\n")
    return path


class TensorRTModel(CompiledModel):
    def __init__(self, plan: Path, profiles: list[Profile], args: ModelArgs, dtype: torch.dtype,
                 device: str | torch.device, trt: ModuleType | None = None) -> None:
        super().__init__(args, dtype, torch.device(device))
        trt = trt or import_tensorrt()
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise ValueError(f"TensorRT could not load {plan} (built by another TensorRT version or GPU?)")
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        if names != set(self.inputs) | set(self.outputs):
            raise ValueError(f"{plan} does not hold this model's graph: tensors {sorted(names)}")
        if self.engine.num_optimization_profiles != len(profiles):
            raise ValueError(f"{plan} has {self.engine.num_optimization_profiles} profiles, its .json {len(profiles)}")
        self.context = self.engine.create_execution_context()
        self.profiles = profiles
        self.active: int | None = None

    @classmethod
    def from_graph(cls, graph: Path, args: ModelArgs, dtype: torch.dtype, device: str, rows: int, slots: int,
                   max_context: int, tree: TreeConfig) -> "TensorRTModel":
        """The plan beside ``graph``, built first where missing, older than the graph or made for other shapes."""
        profiles = engine_profiles(rows, slots, max_context, tree)
        plan = plan_path(graph, dtype)
        meta = plan.with_suffix(".json")
        if (not plan.is_file() or plan.stat().st_mtime < graph.stat().st_mtime or not meta.is_file()
                or json.loads(meta.read_text()) != json.loads(json.dumps([asdict(p) for p in profiles]))):
            build_plan(graph, args, profiles, dtype)
        return cls(plan, profiles, args, dtype, device)

    def profile_for(self, batch: int, tokens: int, width: int, outputs: int) -> int:
        for i, profile in enumerate(self.profiles):
            if profile.covers(batch, tokens, width, outputs):
                return i
        raise ValueError(f"no TensorRT optimisation profile covers batch {batch}, {tokens} tokens, "
                         f"{width} cache slots, {outputs} outputs: {self.profiles}")

    def run(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        b, t, w = inputs["mask"].shape
        index = self.profile_for(b, t, w, inputs["logits_index"].shape[1])
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0
        if index != self.active:
            self.context.set_optimization_profile_async(index, stream)
            self.active = index
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        for name, tensor in outputs.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        if not self.context.execute_async_v3(stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
