"""Export a ``Transformer`` to an ONNX graph whose KV cache is explicit: the graph owns no state.

Graph inputs (``B`` rows, ``T`` fed tokens, ``W`` cache slots, ``G`` tokens whose logits are wanted):
``tokens [B, T]``, ``positions [B, T]``, ``slots [B, T]`` (int64), ``mask [B, T, W]`` (bool, the
``DenseMask`` that ``runner.layout`` builds), ``logits_index [B, G]`` (int64) and, per layer ``i``,
``past_key_i`` / ``past_value_i [B, W, kv_heads, head_dim]``: the first ``W`` slots of the batch's cache
rows. Outputs: ``logits [B, G, V]`` (float32) and ``key_i`` / ``value_i [B, T, kv_heads, head_dim]``, the
K/V of the fed tokens only. Inside, each layer scatters its new K/V into ``past`` at ``slots``
(ScatterND) and attends over the result, exactly as the PyTorch model does in its cache; the caller
(``ort_model.py``) writes the returned K/V into its own cache. Returning only the fed tokens' K/V keeps
the outputs ``T`` rows long instead of ``W``: nothing is copied back that did not change.

The graph is traced from the unchanged model code (``Transformer.forward``) with ``GraphCache``
standing in for ``KVCache``, so there is one definition of the model.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..model.attention import DenseMask
from ..model.checkpoint import ModelArgs
from ..model import Transformer

OPSET = 18
FORMAT = 1  # bump when the graph's inputs or outputs change: stale exports are rebuilt
INPUTS = ("tokens", "positions", "slots", "mask", "logits_index")


def cache_names(layers: int, prefix: tuple[str, str]) -> list[str]:
    """``prefix[0]_0, prefix[1]_0, prefix[0]_1, ...``: K then V of every layer."""
    return [f"{p}_{i}" for i in range(layers) for p in prefix]


def input_names(layers: int) -> list[str]:
    return [*INPUTS, *cache_names(layers, ("past_key", "past_value"))]


def output_names(layers: int) -> list[str]:
    return ["logits", *cache_names(layers, ("key", "value"))]


class GraphCache:
    """``KVCache``'s ``write``/``read`` over explicit per-layer tensors (functional, so it traces)."""

    def __init__(self, past: tuple[torch.Tensor, ...]) -> None:
        self.k, self.v = list(past[0::2]), list(past[1::2])
        self.new: list[torch.Tensor] = []

    def write(self, layer: int, rows: object, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        batch = torch.arange(k.shape[0], device=k.device)[:, None].expand_as(slots)
        self.k[layer] = self.k[layer].index_put((batch, slots), k)
        self.v[layer] = self.v[layer].index_put((batch, slots), v)
        self.new += [k, v]

    def read(self, layer: int, rows: object, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer][:, :width], self.v[layer][:, :width]


class GraphMask(DenseMask):
    """``DenseMask`` with grouped-query heads expanded before SDPA: the ONNX exporter cannot convert
    SDPA's ``enable_gqa``."""

    def attend(self, q: torch.Tensor, cache: GraphCache, layer: int, rows: object) -> torch.Tensor:
        keys, values = cache.read(layer, rows, self.mask.shape[-1])
        groups = q.shape[2] // keys.shape[2]
        keys, values = (t.repeat_interleave(groups, dim=2).transpose(1, 2) for t in (keys, values))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=self.mask[:, None])
        return out.transpose(1, 2)


class GraphForward(nn.Module):
    """The model's forward with the cache as inputs and the fed tokens' K/V as outputs."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        model.batch_invariant(False)  # the row padding is a Python branch on shapes, which a trace would freeze
        self.model = model

    def forward(self, tokens, positions, slots, mask, logits_index, *past):
        cache = GraphCache(past)
        # __wrapped__: the forward without its inference_mode decorator, which tracing cannot see through
        logits = Transformer.forward.__wrapped__(
            self.model, tokens, positions, cache, slice(None), slots, GraphMask(mask), logits_index
        )
        return (logits, *cache.new)


def example_inputs(args: ModelArgs, dtype: torch.dtype, b: int = 2, t: int = 3, w: int = 8) -> tuple[torch.Tensor, ...]:
    """Inputs of the graph's form (values only need to be valid: every dimension is dynamic)."""
    lengths = torch.tensor([w - t - 1] * b)
    slots = lengths[:, None] + torch.arange(t)
    mask = torch.zeros(b, t, w, dtype=torch.bool)
    mask[:, :, : w - t - 1] = True
    mask[:, torch.arange(t), slots[0]] = True
    past = [torch.zeros(b, w, args.num_key_value_heads, args.head_dim, dtype=dtype)
            for _ in range(2 * args.num_hidden_layers)]
    tokens = torch.zeros(b, t, dtype=torch.long)
    return (tokens, slots.clone(), slots, mask, torch.arange(t).expand(b, t).contiguous(), *past)


def export_onnx(model: Transformer, path: Path) -> Path:
    """Write ``model`` (on the CPU, in its dtype) to ``path`` as the graph described above."""
    args = model.args
    layers = args.num_hidden_layers
    dims = {"tokens": {0: "batch", 1: "tokens"}, "positions": {0: "batch", 1: "tokens"},
            "slots": {0: "batch", 1: "tokens"}, "mask": {0: "batch", 1: "tokens", 2: "width"},
            "logits_index": {0: "batch", 1: "outputs"}, "logits": {0: "batch", 1: "outputs"}}
    dims |= {name: {0: "batch", 1: "width"} for name in cache_names(layers, ("past_key", "past_value"))}
    dims |= {name: {0: "batch", 1: "tokens"} for name in cache_names(layers, ("key", "value"))}
    dtype = model.lm_head.weight.dtype
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with torch.no_grad(), warnings.catch_warnings():
        # the note on negative gather indices does not apply: ours are >= 0
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter is deprecated
        warnings.filterwarnings("ignore", message=r"Exporting aten::index", category=UserWarning)
        torch.onnx.export(
            GraphForward(model.cpu()).eval(), example_inputs(args, dtype), str(tmp), dynamo=False,
            input_names=input_names(layers), output_names=output_names(layers), dynamic_axes=dims,
            opset_version=OPSET,
        )
    tmp.replace(path)  # a concurrent reader never sees half a file
    return path


def source_digest(checkpoint: Path) -> str:
    """Identifies a checkpoint's contents cheaply (names, sizes, modification times of its files)."""
    files = [checkpoint] if checkpoint.is_file() else sorted(p for p in checkpoint.iterdir() if p.is_file())
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def compiled_dir(checkpoint: str | Path, dtype: str) -> Path:
    """Where a checkpoint's compiled artefacts live: beside it (``engines/`` keeps them git-ignored)."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_file():  # a .gguf file
        return checkpoint.with_name(checkpoint.stem + ".compiled") / dtype
    return checkpoint / "compiled" / dtype


def ensure_onnx(checkpoint: str | Path, dtype: str, load: "callable[[], Transformer]", force: bool = False) -> Path:
    """The checkpoint's graph, exported (with ``load()``) unless a current one is already there.

    ``engine.json`` beside the graph records the checkpoint digest and graph format it was made from.
    """
    folder = compiled_dir(checkpoint, dtype)
    graph, meta = folder / "model.onnx", folder / "engine.json"
    want = {"source_digest": source_digest(Path(checkpoint)), "format": FORMAT, "opset": OPSET, "dtype": dtype}
    if not force and graph.is_file() and meta.is_file():
        have = json.loads(meta.read_text())
        if all(have.get(k) == v for k, v in want.items()):
            return graph
    try:
        export_onnx(load(), graph)
    except OSError as exc:
        raise ValueError(f"cannot write the ONNX graph of {checkpoint} to {folder}: {exc}") from exc
    meta.write_text(json.dumps(want, indent=1) + "\n")
    return graph
