"""Megatron-style sharding of a Llama checkpoint over tensor-parallel ranks, as pure functions.

Rank ``r`` of ``n`` holds: query heads ``[r*H/n, (r+1)*H/n)``; its key/value heads (``KV/n`` of
them, or the one its query heads read when ``n`` exceeds ``KV``: those are then replicated); the
matching rows of the fused ``qkv_proj`` and of both halves of ``gate_up_proj`` (column-parallel),
the matching columns of ``o_proj`` and ``down_proj`` (row-parallel: partial sums, all-reduced);
and a ``ceil(V/n)``-row slice of the vocabulary for ``embed_tokens`` and ``lm_head`` (rows past
``V`` are zero padding). Norms and biases of row-parallel layers are replicated.
"""
from __future__ import annotations

import dataclasses

import torch

from ..model.checkpoint import ModelArgs


def valid_sizes(args: ModelArgs) -> list[int]:
    """Tensor-parallel sizes the model's heads and MLP width allow."""
    h, kv = args.num_attention_heads, args.num_key_value_heads
    return [n for n in range(1, h + 1)
            if h % n == 0 and (kv % n == 0 or n % kv == 0) and args.intermediate_size % n == 0]


def check_size(args: ModelArgs, size: int) -> None:
    if size not in valid_sizes(args):
        raise ValueError(
            f"tensor_parallel_size={size} does not split this LLM ({args.num_attention_heads} attention heads, "
            f"{args.num_key_value_heads} key/value heads, MLP width {args.intermediate_size}): "
            f"sizes that work are {valid_sizes(args)}"
        )


def local_vocab(args: ModelArgs, size: int) -> int:
    return -(-args.vocab_size // size)


def shard_args(args: ModelArgs, size: int) -> ModelArgs:
    """The hyper-parameters of one rank's slice of the model (same for every rank)."""
    check_size(args, size)
    return dataclasses.replace(
        args, num_attention_heads=args.num_attention_heads // size,
        num_key_value_heads=max(1, args.num_key_value_heads // size),
        intermediate_size=args.intermediate_size // size, vocab_size=local_vocab(args, size),
    )


def kv_heads_of(args: ModelArgs, rank: int, size: int) -> range:
    """The key/value heads rank ``rank`` holds: its own share, or the one its query heads read."""
    kv = args.num_key_value_heads
    if size <= kv:
        per = kv // size
        return range(rank * per, (rank + 1) * per)
    first_query = rank * (args.num_attention_heads // size)
    head = first_query // (args.num_attention_heads // kv)
    return range(head, head + 1)


def shard_state(state: dict[str, torch.Tensor], args: ModelArgs, rank: int, size: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s tensors from the full (fused) state dict ``state`` of a model of ``args``."""
    d, h = args.head_dim, args.num_attention_heads
    q_per = h // size
    kv = kv_heads_of(args, rank, size)
    inter = args.intermediate_size // size
    vocab = local_vocab(args, size)

    def heads(t: torch.Tensor, first: int, count: int) -> torch.Tensor:
        return t[first * d: (first + count) * d]

    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if "qkv_proj." in name:
            q, k, v = t.split([h * d, args.num_key_value_heads * d, args.num_key_value_heads * d])
            out[name] = torch.cat([heads(q, rank * q_per, q_per), heads(k, kv.start, len(kv)),
                                   heads(v, kv.start, len(kv))])
        elif "gate_up_proj." in name:
            gate, up = t.chunk(2)
            out[name] = torch.cat([gate[rank * inter: (rank + 1) * inter], up[rank * inter: (rank + 1) * inter]])
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            width = t.shape[1] // size
            out[name] = t[:, rank * width: (rank + 1) * width].contiguous()  # a copy: the full tensor is freed
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            part = t[rank * vocab: (rank + 1) * vocab]
            out[name] = torch.cat([part, part.new_zeros(vocab - part.shape[0], *part.shape[1:])])
        else:  # norms and the biases of row-parallel layers (added once, after the all-reduce)
            out[name] = t
    return out
