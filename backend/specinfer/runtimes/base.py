"""What a compiled SSM engine implements to run behind ``ModelRunner`` exactly like ``Transformer``.

``ModelRunner`` (``forward(rows, lengths, nodes, output_index)``, ``commit``, ``seconds``) is the engine
interface the step loop and ``draft.py`` use; it needs of its model only ``args``, ``new_cache`` and the
call ``model(tokens, positions, cache, rows, slots, visibility, output_index)``. ``CompiledModel``
gives those for the exported graph (``onnx_export.py``): it feeds the graph the batch's cache prefix,
writes the fed tokens' K/V the graph returns into the runner's cache, and leaves running the graph to
a subclass (``run``), which binds the tensors it is given by address: no copies in or out.
"""
from __future__ import annotations

import torch

from ..model.attention import DenseMask
from ..model.checkpoint import ModelArgs
from ..model.kv_cache import KVCache, Rows
from .onnx_export import input_names, output_names


class CompiledModel:
    """Base of the ONNX Runtime and TensorRT models; takes ``DenseMask`` visibility (``attention="sdpa"``)."""

    attention = "sdpa"

    def __init__(self, args: ModelArgs, dtype: torch.dtype, device: torch.device) -> None:
        self.args, self.dtype, self.device = args, dtype, torch.device(device)
        self.inputs, self.outputs = input_names(args.num_hidden_layers), output_names(args.num_hidden_layers)

    def new_cache(self, rows: int, slots: int) -> KVCache:
        a = self.args
        return KVCache(a.num_hidden_layers, rows, slots, a.num_key_value_heads, a.head_dim, self.dtype, self.device)

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, rows: Rows,
        slots: torch.Tensor, visibility: DenseMask, output_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``Transformer.forward``'s contract: logits ``[B, T, V]``, or ``[B, V]`` at ``output_index``."""
        if not isinstance(visibility, DenseMask):
            raise TypeError(f"{type(self).__name__} reads a dense mask (attention='sdpa'), got {type(visibility).__name__}")
        b, t = tokens.shape
        mask = visibility.mask
        index = (output_index[:, None] if output_index is not None else torch.arange(t, device=self.device).expand(b, t))
        past = [x.contiguous() for layer in range(self.args.num_hidden_layers) for x in cache.read(layer, rows, mask.shape[-1])]
        feeds = [tokens, positions, slots, mask, index, *past]
        a = self.args
        new_kv = [torch.empty(b, t, a.num_key_value_heads, a.head_dim, dtype=self.dtype, device=self.device)
                  for _ in range(2 * a.num_hidden_layers)]
        logits = torch.empty(b, index.shape[1], a.vocab_size, dtype=torch.float32, device=self.device)
        self.run(dict(zip(self.inputs, (x.contiguous() for x in feeds))), dict(zip(self.outputs, [logits, *new_kv])))
        for layer in range(a.num_hidden_layers):
            cache.write(layer, rows, slots, new_kv[2 * layer], new_kv[2 * layer + 1])
        return logits[:, 0] if output_index is not None else logits

    def run(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Run the graph on ``inputs``, writing into the preallocated ``outputs`` (contiguous tensors)."""
        raise NotImplementedError
