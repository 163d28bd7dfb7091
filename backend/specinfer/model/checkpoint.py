"""Llama-family checkpoints: a Hugging Face folder (``config.json`` + ``*.safetensors``, sharded or not)
or a single llama ``.gguf`` file (see ``gguf.py``)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .gguf import is_gguf, read_gguf, read_gguf_config

SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    eos_token_ids: tuple[int, ...]

    @staticmethod
    def from_config(cfg: dict, source: str = "config") -> "ModelArgs":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: model_type {model_type!r} is not a supported Llama-family model "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (silu only)")
        # transformers v5 writes rope settings as `rope_parameters`; v4 as `rope_theta` + `rope_scaling`.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"{source}: rope type {rope_type!r} is not supported ({SUPPORTED_ROPE_TYPES})")
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return ModelArgs(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", False),
            mlp_bias=cfg.get("mlp_bias", False),
            eos_token_ids=eos_ids,
        )


def read_model_args(folder: str | Path) -> ModelArgs:
    if is_gguf(folder):
        return ModelArgs.from_config(read_gguf_config(folder), source=str(folder))
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"checkpoint folder {str(folder)!r} does not exist")
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"checkpoint folder {str(folder)!r} has no config.json")
    try:
        cfg = json.loads(config.read_text())
        return ModelArgs.from_config(cfg, source=str(config))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{config}: not a valid Llama config ({exc!r})") from exc


def read_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, following ``model.safetensors.index.json`` when sharded."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"checkpoint folder {str(folder)!r} has no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{index}: names shard {name!r}, which is missing")
        state.update(load_file(str(path)))
    return state


def read_checkpoint(path: str | Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Hyper-parameters and tensors (Hugging Face names) of a checkpoint folder or ``.gguf`` file."""
    if is_gguf(path):
        ckpt = read_gguf(path)
        return ModelArgs.from_config(ckpt.config, source=str(path)), ckpt.state
    return read_model_args(path), read_state_dict(path)
