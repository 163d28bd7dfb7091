"""SSM engines behind ``ModelRunner``: PyTorch (``Transformer``), ONNX Runtime, TensorRT.

``load_model(kind, checkpoint, ...)`` returns what ``ModelRunner`` runs. The compiled kinds use the
checkpoint's exported graph (``onnx_export.ensure_onnx``: made once, beside the checkpoint).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..model.checkpoint import read_model_args
from ..config import SSM_ENGINES, TreeConfig
from ..model import Transformer
from .base import CompiledModel
from .onnx_export import ensure_onnx


def load_model(kind: str, checkpoint: str | Path, device: str, dtype: torch.dtype, rows: int, slots: int,
               max_context: int, tree: TreeConfig) -> Transformer | CompiledModel:
    """The model of ``checkpoint`` for engine ``kind``; the engine's capacity (``rows``, ``slots``,
    ``max_context``, ``tree``) bounds the shapes it is asked for (TensorRT's optimisation profiles)."""

    load = lambda: Transformer.from_pretrained(checkpoint, device=device, dtype=dtype)  # noqa: E731
    if kind == "torch":
        return load()
    if kind == "onnxruntime" and device == "cpu":
        dtype = torch.float32  # ONNX Runtime's CPU kernels compute float32 (the SSM's dtype need not be the LLM's)
    export = lambda: Transformer.from_pretrained(checkpoint, device="cpu", dtype=dtype)  # noqa: E731
    graph = ensure_onnx(checkpoint, str(dtype).removeprefix("torch."), export)
    args = read_model_args(checkpoint)
    if kind == "onnxruntime":
        from .onnxruntime_model import OnnxRuntimeModel

        return OnnxRuntimeModel(graph, args, dtype, device)
    if kind == "tensorrt":
        from .tensorrt_model import TensorRTModel

        return TensorRTModel.from_graph(graph, args, dtype, device, rows, slots, max_context, tree)
    raise ValueError(f"ssm_engine must be one of {SSM_ENGINES}, got {kind!r}")
