"""GGUF checkpoints (llama.cpp's single-file format) of the ``llama`` architecture.

The ``gguf`` package reads the file and dequantises every tensor type it knows (F32, F16, BF16,
Q4_0 ... Q8_0, the K-quants); this module maps llama.cpp's names and metadata onto a Hugging Face
``config.json`` dictionary and state dict, so the rest of the engine sees one checkpoint format.
The file's tokenizer is read in ``tokenizer.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass
class GGUFCheckpoint:
    config: dict  # as a Hugging Face ``config.json`` would hold it
    state: dict[str, torch.Tensor]


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def _reader(path: str | Path):
    try:
        from gguf import GGUFReader
    except ImportError as exc:  # pragma: no cover - the set-up installs it
        raise ValueError("reading a .gguf checkpoint needs the `gguf` package (pip install -e '.[gguf]')") from exc
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"GGUF checkpoint {str(path)!r} does not exist")
    try:
        return GGUFReader(str(path))
    except Exception as exc:  # the reader raises assorted errors on truncated or foreign files
        raise ValueError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from exc


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def read_gguf_config(path: str | Path) -> dict:
    """The ``config.json`` dictionary of a llama GGUF file; other architectures get a ValueError."""
    return _config(_reader(path), Path(path))


def _config(reader, path: Path) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (llama only)")

    def need(key: str):
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise ValueError(f"{path}: GGUF metadata lacks llama.{key}")
        return value

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    head_dim = int(_field(reader, "llama.attention.key_length", _field(reader, "llama.rope.dimension_count", hidden // heads)))
    vocab = _field(reader, "llama.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(f"{path}: per-dimension rope frequency factors (rope_freqs) are not supported")
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ValueError(f"{path}: rope scaling {scaling!r} is not supported (none, linear)")
    rope = {"rope_type": "default", "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0))}
    if scaling == "linear":
        rope = {**rope, "rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_parameters": rope,
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "hidden_act": "silu",
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "torch_dtype": "float32",
    }


def unpermute_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (its rope rotates interleaved pairs, HF's rotates halves).

    llama.cpp's converter reshapes each head's rows to ``[2, d/2]`` and swaps the axes; this is the
    inverse, applied to the rows of a weight or a bias.
    """
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_name(name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    raise ValueError(f"unexpected GGUF tensor {name!r} for the llama architecture")


def read_gguf(path: str | Path) -> GGUFCheckpoint:
    """Config and dequantised float32 tensors (Hugging Face names and layouts) of a llama GGUF file."""
    from gguf import dequantize

    reader = _reader(path)
    config = _config(reader, Path(path))
    state = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        expected = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
        try:
            weight = dequantize(tensor.data, tensor.tensor_type).reshape(expected)
        except (ValueError, NotImplementedError) as exc:
            raise ValueError(f"{path}: cannot read tensor {tensor.name} ({tensor.tensor_type.name}): {exc}") from exc
        if ".q_proj." in name:
            weight = unpermute_rope(weight, config["num_attention_heads"])
        elif ".k_proj." in name:
            weight = unpermute_rope(weight, config["num_key_value_heads"])
        state[name] = torch.from_numpy(np.array(weight, dtype=np.float32))  # a copy: the file is memory-mapped read-only
    return GGUFCheckpoint(config, state)
