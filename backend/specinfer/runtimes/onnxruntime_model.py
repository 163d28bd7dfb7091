"""The exported graph run by ONNX Runtime: CPU execution provider here; TensorRT and CUDA providers,
where the installed onnxruntime has them, on CUDA devices.

Every input and output is bound by address (I/O binding) to the torch tensors ``CompiledModel``
prepares, so a forward copies nothing between torch and ONNX Runtime on either device.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..model.checkpoint import ModelArgs
from .base import CompiledModel

ELEMENT_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.bool: np.bool_}
CUDA_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def providers_for(device: torch.device, available: list[str]) -> list[str]:
    """CPU alone on the CPU; on CUDA the GPU providers this onnxruntime has, CPU last (ONNX Runtime
    places what a GPU provider cannot run there)."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    gpu = [p for p in CUDA_PROVIDERS if p in available]
    if not gpu:
        raise ValueError("ssm_engine='onnxruntime' on CUDA needs onnxruntime-gpu (no CUDA execution provider found)")
    return [*gpu, "CPUExecutionProvider"]


class OnnxRuntimeModel(CompiledModel):
    def __init__(self, graph: Path, args: ModelArgs, dtype: torch.dtype, device: str | torch.device,
                 threads: int | None = None) -> None:
        import onnxruntime as ort  # imported only where this engine is chosen

        super().__init__(args, dtype, torch.device(device))
        if dtype not in ELEMENT_TYPES or (self.device.type == "cpu" and dtype != torch.float32):
            raise ValueError(f"ssm_engine='onnxruntime' runs float32 on the CPU (float16 on CUDA), not {dtype}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        # ONNX Runtime's threads otherwise spin after each run, taking the cores from the LLM's torch threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(graph), opts, providers=providers_for(self.device, ort.get_available_providers()))
        self.binding = self.session.io_binding()
        self.device_id = self.device.index or 0

    def run(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        binding, dev = self.binding, self.device.type
        for names, bind in ((inputs, binding.bind_input), (outputs, binding.bind_output)):
            for name, t in names.items():
                bind(name, dev, self.device_id, ELEMENT_TYPES[t.dtype], list(t.shape), t.data_ptr())
        self.session.run_with_iobinding(binding)
