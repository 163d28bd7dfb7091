"""The collectives of a tensor-parallel forward, and the layers of ``model.py`` that need them.

The sharded model is ``model.Transformer`` built with one rank's dimensions (``shard.shard_args``)
whose row-parallel projections, embedding and LM head are swapped for the subclasses below before
the weights load: the forward pass stays the one in ``model.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.checkpoint import ModelArgs
from ..model import Linear
from .shard import shard_args, shard_state


class Collectives:
    """The data-plane process group of one rank (gloo on CPU, NCCL on CUDA), replaced on restart."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size
        self.group = None  # set by connect(); a ProcessGroup

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        self.group.allreduce([x]).wait()
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` concatenated along the last dimension, on rank 0; ``x`` elsewhere."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else []
        self.group.gather(parts, x, 0).wait()
        return torch.cat(parts, dim=-1) if self.rank == 0 else x


class RowParallelLinear(Linear):
    """``o_proj`` / ``down_proj`` over this rank's input columns: partial sums all-reduced, bias once."""

    def __init__(self, comm: Collectives, like: nn.Linear) -> None:
        super().__init__(like.in_features, like.out_features, bias=like.bias is not None, device=like.weight.device)
        self.comm = comm

    def forward(self, x: torch.Tensor, generated: bool = False) -> torch.Tensor:
        y = self.comm.all_reduce(self.project(x, None, generated))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows of the vocabulary; tokens of other ranks embed as zeros, then all-reduced."""

    def __init__(self, comm: Collectives, like: nn.Embedding) -> None:
        super().__init__(like.num_embeddings, like.embedding_dim, device=like.weight.device)
        self.comm = comm

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.comm.rank * self.num_embeddings
        mine = (local >= 0) & (local < self.num_embeddings)
        x = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight) * mine[..., None]
        return self.comm.all_reduce(x)


class VocabParallelHead(Linear):
    """This rank's vocabulary slice of the logits, gathered on rank 0 and trimmed to the vocabulary."""

    def __init__(self, comm: Collectives, like: nn.Linear, vocab: int) -> None:
        super().__init__(like.in_features, like.out_features, bias=False, device=like.weight.device)
        self.comm, self.vocab = comm, vocab

    def forward(self, x: torch.Tensor, generated: bool = False) -> torch.Tensor:
        return self.comm.gather_last_dim(self.project(x, None, generated))[..., : self.vocab]


def parallelize(model: nn.Module, comm: Collectives, vocab: int) -> None:
    """Swap the layers of ``model`` (a ``Transformer`` of one rank's dimensions, on the meta device,
    before its weights load) that communicate for the tensor-parallel ones above."""
    for layer in model.model.layers:
        layer.self_attn.o_proj = RowParallelLinear(comm, layer.self_attn.o_proj)
        layer.mlp.down_proj = RowParallelLinear(comm, layer.mlp.down_proj)
    model.model.embed_tokens = VocabParallelEmbedding(comm, model.model.embed_tokens)
    model.lm_head = VocabParallelHead(comm, model.lm_head, vocab)


class Shard:
    """How ``Transformer.from_pretrained`` builds and fills one rank's slice of a tensor-parallel model."""

    def __init__(self, comm: Collectives) -> None:
        self.comm = comm

    def build(self, cls: type, args: ModelArgs) -> nn.Module:
        model = cls(shard_args(args, self.comm.size))
        parallelize(model, self.comm, args.vocab_size)
        return model

    def state(self, state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
        return shard_state(state, args, self.comm.rank, self.comm.size)
