"""Llama-family transformer whose forward takes tokens, positions, cache slots and what each token sees.

One code path serves prefill (a causal chunk), one-token decoding and tree verification (a
topology-aware mask): the caller decides which cache slots each token sees. Parameter names mirror
Hugging Face's ``LlamaForCausalLM`` so checkpoints load without renaming.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.rows_linear import PACKED_FROM, fits, pack, rows_linear
from .attention import Visibility
from .batch_invariance import DEVICE_ROWS, in_pieces, padded_rows, row_limit
from .checkpoint import ModelArgs, read_checkpoint
from .kv_cache import KVCache, Rows
from .offload import OFFLOAD, LayerStreamer

if TYPE_CHECKING:
    from ..parallel.layers import Shard


class RMSNorm(nn.Module):
    invariant = True  # as ``Linear.invariant``

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if x.device.type == "cpu" or not self.invariant or rows == 0:
            return self.normalize(x)
        # CUDA's mean rounds a row by the call's row count (H200, float32, width 576: 1-15 against 16+
        # rows; cuda_rounding.py), so every call has DEVICE_ROWS rows, as Linear's do.
        return in_pieces(self.normalize, x, DEVICE_ROWS)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Linear(nn.Linear):
    """``nn.Linear`` that can pad its rows (zeros appended, results dropped) and split calls past
    ``row_limit`` rows on the CPU (on CUDA every call has ``DEVICE_ROWS``), so that a row's result does
    not depend on how many rows share the call (``batch_invariance.py``)."""

    invariant = True  # Transformer.batch_invariant switches a model's layers off (to measure the cost, to trace)

    def forward(self, x: torch.Tensor, generated: bool = False) -> torch.Tensor:
        return self.project(x, self.bias, generated)

    def project(self, x: torch.Tensor, bias: torch.Tensor | None, generated: bool = False) -> torch.Tensor:
        """``generated``: the rows are generated tokens on the CPU kernels' form (``Visibility.cpu_kernels``),
        which ``rows_linear`` computes where it fits the layer."""
        rows = x.numel() // x.shape[-1]
        if not self.invariant or rows == 0:
            return F.linear(x, self.weight, bias)
        if generated and fits(self.weight, bias):
            return rows_linear(x, self.weight, self.packed() if rows >= PACKED_FROM else None, bias)
        device = x.device
        most = row_limit(self.out_features, self.in_features, x.dtype) if device.type == "cpu" else DEVICE_ROWS
        if rows <= most and padded_rows(rows, x.dtype, device) == rows:
            return F.linear(x, self.weight, bias)
        return in_pieces(lambda p: F.linear(p, self.weight, bias), x, most)

    def packed(self) -> torch.Tensor:
        """The weight in ``rows_linear``'s layout: a copy made on the first generated call of
        ``PACKED_FROM`` rows or more (a model that never runs that many generated tokens in one
        forward holds none), made again once the weight changed: replaced, sharded or moved (another
        storage) or written in place (its version counter: loading, offloading's copies; writes
        through ``.data``, which PyTorch does not count, are not seen). The copy holds a view of the
        weight it was made from, so that memory is not reused by another weight while the copy
        stands. A weight made under ``torch.inference_mode`` counts no writes at all: its copy is made
        on every call (correct, slower; a warning says so)."""
        w = self.weight
        if w.is_inference():  # Python shows a warning once per place by default
            warnings.warn("the model's weights were made under torch.inference_mode, which does not count their "
                          "in-place writes: generated calls of 3 rows or more repack them every time (load the "
                          "model outside inference mode to keep one packed copy)")
            return pack(w)
        source, version, packed = self.__dict__.get("_packed", (None, -1, None))
        if source is None or source.data_ptr() != w.data_ptr() or source._version != version or source.shape != w.shape:
            source = w.detach()
            packed = pack(source)
            self.__dict__["_packed"] = (source, source._version, packed)
        return packed


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Rotary inverse frequencies, with ``linear`` or ``llama3`` scaling applied."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq.float()
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return (inv_freq / factor).float()
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled).float()


class Packing:
    """The real tokens of a padded ``[B, T]`` batch as one flat run of ``N``: the per-token layers
    (embedding, projections, norms, MLP, LM head) compute only those, attention sees them padded back.

    Verifying trees of different sizes, or prompts of different lengths, pads every request to the
    largest; unpacked, the padding costs as much as real tokens. Packing leaves each real token's
    result as it was: every per-token layer is batch-invariant (``batch_invariance.py``)."""

    def __init__(self, valid: torch.Tensor | None, device: torch.device) -> None:
        """``valid [B, T]`` (``None``: no padding to skip)."""
        self.index = None if valid is None or bool(valid.all()) else valid.flatten().nonzero().flatten().to(device)
        self.shape = None if valid is None else tuple(valid.shape)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, ...]`` -> ``[N, ...]`` (as it is without padding)."""
        return x if self.index is None else x.flatten(0, 1)[self.index]

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, ...]`` -> ``[B, T, ...]``, zeros at the padding (as it is without padding)."""
        if self.index is None:
            return x
        out = x.new_zeros(self.shape[0] * self.shape[1], *x.shape[1:])
        out[self.index] = x
        return out.view(*self.shape, *x.shape[1:])

    def position(self, output_index: torch.Tensor) -> torch.Tensor:
        """Packed positions of the padded ones ``output_index [B]`` or ``[B, G]`` (real tokens)."""
        b = self.shape[0]
        where = torch.full((b * self.shape[1],), -1, dtype=torch.long, device=output_index.device)
        where[self.index.to(output_index.device)] = torch.arange(len(self.index), device=output_index.device)
        flat = torch.arange(b, device=output_index.device).view(-1, *[1] * (output_index.dim() - 1)) * self.shape[1]
        return where[flat + output_index]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        bias = args.attention_bias
        self.split = [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
        self.qkv_proj = Linear(args.hidden_size, sum(self.split), bias=bias)  # q, k, v fused (one matmul)
        self.o_proj = Linear(self.heads * self.head_dim, args.hidden_size, bias=bias)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
        rows: Rows, slots: torch.Tensor, visibility: Visibility, packing: Packing,
    ) -> torch.Tensor:
        """``x``: ``[B, T, D]``, or ``[N, D]`` packed (``packing``), and so is the result."""
        q, k, v = packing.unpack(self.qkv_proj(x, visibility.cpu_kernels)).split(self.split, dim=-1)
        b, t = q.shape[:2]
        q = q.view(b, t, self.heads, self.head_dim)
        k = k.view(b, t, self.kv_heads, self.head_dim)
        v = v.reshape(b, t, self.kv_heads, self.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        cache.write(self.layer, rows, slots, k, v)
        out = visibility.attend(q, cache, self.layer, rows)
        return self.o_proj(packing.pack(out.reshape(b, t, -1)), visibility.cpu_kernels)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        h, i, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_up_proj = Linear(h, 2 * i, bias=bias)  # gate and up fused (one matmul)
        self.down_proj = Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor, generated: bool = False) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, generated).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up, generated)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cos, sin, cache, rows, slots, visibility, packing):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, rows, slots, visibility, packing)
        return x + self.mlp(self.post_attention_layernorm(x), visibility.cpu_kernels)


class LlamaBody(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def fuse_projections(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face's separate q/k/v and gate/up weights (and biases) as this model's fused ones.

    A layer missing one of the parts is left as it is, for the load's name check to report.
    """
    state = dict(state)
    for fused, parts in FUSED.items():
        for name in [k for k in state if f".{parts[0]}." in k]:
            prefix, suffix = name.split(f".{parts[0]}.")
            names = [f"{prefix}.{part}.{suffix}" for part in parts]
            if all(n in state for n in names):
                state[f"{prefix}.{fused}.{suffix}"] = torch.cat([state.pop(n) for n in names])
    return state


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = LlamaBody(args)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.streamer: LayerStreamer | None = None  # set by ``offload``: the layers' weights live in host memory

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                        shard: "Shard | None" = None, offload: str = "none") -> "Transformer":
        """The checkpoint's model; with ``shard``, one rank's slice of it (``parallel/``); with
        ``offload="cpu"`` its decoder layers stay in host memory, streamed to ``device`` (``offload.py``)."""
        if offload not in OFFLOAD:
            raise ValueError(f"offload must be one of {OFFLOAD}, got {offload!r}")
        if offload != "none" and shard is not None:
            raise ValueError("offload needs the whole model: a tensor-parallel shard is not streamed from host memory")
        args, state = read_checkpoint(folder)
        with torch.device("meta"):
            model = cls(args) if shard is None else shard.build(cls, args)
        state = fuse_projections({k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")})
        if shard is not None:
            state = shard.state(state, args)
        expected = set(model.state_dict())
        if args.tie_word_embeddings:
            state.pop("lm_head.weight", None)
            expected.discard("lm_head.weight")
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {str(folder)!r} does not match a Llama model of its config: "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        model.load_state_dict(state, assign=True, strict=False)
        if args.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.inv_freq = rope_inv_freq(args)  # replaces the meta buffer
        if offload == "cpu":
            model = model.to(dtype=dtype).eval()
            model.offload(device)
        else:
            model = model.to(device=device, dtype=dtype).eval()
        model.inv_freq = rope_inv_freq(args).to(device)  # stays float32 whatever the weights' dtype
        return model

    def offload(self, device: torch.device | str) -> None:
        """Keep the decoder layers' weights in host memory and stream them into ``device`` buffers for
        every forward (``offload.py``); embeddings, final norm and LM head move to ``device``."""
        self.streamer = LayerStreamer(self.model.layers, device)
        for module in (self.model.embed_tokens, self.model.norm, self.lm_head):
            module.to(device)
        self.inv_freq = self.inv_freq.to(device)

    def batch_invariant(self, on: bool) -> None:
        """Whether every linear layer (and on CUDA every RMSNorm) pads its rows to the dtype's batch-invariant
        class (on by default; off only to measure what the property costs, and for tracing graphs of dynamic shape)."""
        for module in [*self.modules(), *(self.streamer.modules() if self.streamer else ())]:
            if isinstance(module, (Linear, RMSNorm)):
                module.invariant = on

    def new_cache(self, rows: int, slots: int) -> KVCache:
        a = self.args
        p = self.lm_head.weight
        return KVCache(a.num_hidden_layers, rows, slots, a.num_key_value_heads, a.head_dim, p.dtype, p.device)

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, rows: Rows,
        slots: torch.Tensor, visibility: Visibility, output_index: torch.Tensor | None = None,
        valid: torch.Tensor | None = None, hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, T, V]`` for ``tokens [B, T]`` at ``positions``, written to ``slots`` of ``rows``.

        ``visibility`` says which cache slots each token attends to (its own slot included), in the
        form of the chosen attention backend (``attention.py``). With ``output_index [B]`` only that token of each row reaches the LM head
        and the result is ``[B, V]``; ``output_index [B, G]`` gives ``[B, G, V]`` (exported graphs take that form).
        ``valid [B, T]``: the real tokens; the padding's are not computed (``Packing``; logits 0 there).
        ``hidden``: also return the final normed hidden states the logits were read from (the draft
        head's input, ``proposers/head.py``), shaped as the logits but ``H`` wide.
        """
        packing = Packing(valid, tokens.device)
        freqs = positions[..., None].float() * self.inv_freq
        cos = torch.cat((freqs, freqs), dim=-1).cos()[:, :, None].to(self.lm_head.weight.dtype)
        sin = torch.cat((freqs, freqs), dim=-1).sin()[:, :, None].to(self.lm_head.weight.dtype)
        x = self.model.embed_tokens(packing.pack(tokens))
        for layer in self.model.layers if self.streamer is None else self.streamer:
            x = layer(x, cos, sin, cache, rows, slots, visibility, packing)
        if output_index is None:
            normed = self.model.norm(x)
            logits = packing.unpack(self.lm_head(normed, visibility.cpu_kernels).float())
            return (logits, packing.unpack(normed)) if hidden else logits
        if packing.index is None:
            batch = torch.arange(x.shape[0], device=x.device).view(-1, *[1] * (output_index.dim() - 1))
            normed = self.model.norm(x[batch, output_index])
        else:
            normed = self.model.norm(x[packing.position(output_index)])
        logits = self.lm_head(normed, visibility.cpu_kernels).float()
        return (logits, normed) if hidden else logits
