"""The draft head: token trees drafted from the LLM's own last hidden state (a recurrent draft head,
as Apple's ReDrafter; Medusa's heads without their blindness to the tokens drafted above them).

The LLM's final (normed) hidden state at a request's last verified node already saw the whole
context; the head carries it forward one drafted token at a time with one small MLP,
``state' = state + down(silu(up([state, embed(token)])))``, and reads each state with the LLM's own
output layer, restricted to the head's vocabulary (the tokens its training data used most, a few thousand:
the output layer is most of a draft level's cost). One level of every request's tree is
one batched call; nothing runs per request or per node. The head drafts no K/V and keeps no cache:
its only state is one hidden vector per cache row, set after each verification (``remember``).
"""
from __future__ import annotations

import copy
import json
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..sequence import Sequence
from ..tree import TreeBatch, ancestor_mask
from .base import Plan

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


class DraftHead(nn.Module):
    """The head's weights: ``up [width, 2 hidden]``, ``down [hidden, width]`` and ``vocab [K]``, the
    token ids it can draft (rows of the LLM's output layer it reads)."""

    def __init__(self, hidden: int, width: int, vocab: torch.Tensor) -> None:
        super().__init__()
        self.up = nn.Linear(2 * hidden, width)
        self.down = nn.Linear(width, hidden)
        self.register_buffer("vocab", vocab.long())

    def step(self, state: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """The state after feeding a token (``embedded``: its LLM input embedding), same shape."""
        return state + self.down(F.silu(self.up(torch.cat([state, embedded], dim=-1))))

    @staticmethod
    def read_config(folder: str | Path, hidden: int) -> dict:
        """The head folder's config, checked against the LLM's hidden size ``hidden``."""
        path = Path(folder) / CONFIG
        if not path.is_file():
            raise ValueError(f"{str(folder)!r} is not a draft head's folder (no {CONFIG})")
        config = json.loads(path.read_text())
        if config.get("hidden_size") != hidden:
            raise ValueError(f"draft head {str(folder)!r} reads hidden states of {config.get('hidden_size')} "
                             f"values, the LLM's have {hidden}")
        return config

    @classmethod
    def from_pretrained(cls, folder: str | Path, hidden: int) -> "DraftHead":
        from safetensors.torch import load_file

        config = cls.read_config(folder, hidden)
        state = load_file(str(Path(folder) / WEIGHTS))
        head = cls(hidden, config["width"], state["vocab"])
        head.load_state_dict(state)
        return head.eval()

    def save(self, folder: str | Path, **about: object) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"hidden_size": self.down.out_features, "width": self.up.out_features, **about}
        (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS))


def int8_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows [K, H]`` as int8 and a scale per row (``rows ~ int8 * scale``), the scales in ``rows``' dtype."""
    scales = rows.float().abs().amax(dim=1).clamp_min(1e-12) / 127
    return torch.round(rows.float() / scales[:, None]).to(torch.int8), scales.to(rows.dtype)


class Int8Linear(nn.Module):
    """``x @ weight.T + bias`` with the weight read as int8 rows and a scale per row (``int8_rows``).

    On the CPU a draft level's layers are bound by memory at its few rows (8,192 x 576 output rows in
    bf16: 0.34 ms for one state, 0.37 for three; the 1,152-wide MLP 0.20 ms): int8 halves the bytes
    (0.15 / 0.23 ms for the output rows, 0.07 / 0.11 ms for the MLP). Drafts only: the LLM verifies every token, so the output
    stays exact whatever the head reads."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        q, scales = int8_rows(weight.detach())
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y = torch._weight_int8pack_mm(flat, self.weight, self.scales).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        """The weight as this layer reads it, in the scales' dtype."""
        return self.weight.to(self.scales.dtype) * self.scales[:, None]


def head_tree(expansion: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Parents and depths of the head's fixed tree shape: ``expansion[d]`` children under every node
    of level ``d`` (root first, levels in order)."""
    parents, depths, level = [-1], [0], [0]
    for d, k in enumerate(expansion):
        nxt = []
        for p in level:
            for _ in range(k):
                nxt.append(len(parents))
                parents.append(p)
                depths.append(d + 1)
        level = nxt
    return torch.tensor(parents), torch.tensor(depths)


class HeadProposer:
    """Drafts every request's tree with ``DraftHead`` over the LLM's embeddings and output layer.
    ``hidden [rows, H]``: each cache row's LLM hidden state at its last verified node."""

    name = "head"

    def __init__(self, head: DraftHead, embed: torch.Tensor, output: torch.Tensor, rows: int,
                 expansion: tuple[int, ...]) -> None:
        if int(head.vocab.max()) >= output.shape[0] or max(expansion) > len(head.vocab):
            raise ValueError(f"draft head drafts token ids up to {int(head.vocab.max())} and {len(head.vocab)} tokens "
                             f"in all: the LLM has {output.shape[0]}, head_expansion asks for up to {max(expansion)} children")
        dtype, device = embed.dtype, embed.device
        head = head.to(device=device, dtype=dtype)
        drafted = output[head.vocab]  # [K, H]: the rows of the output layer the head drafts
        if device.type == "cpu":  # a copy with int8 layers (``Int8Linear``): the caller's head keeps its own
            quantized = copy.deepcopy(head)
            quantized.up, quantized.down = Int8Linear(head.up.weight, head.up.bias), Int8Linear(head.down.weight, head.down.bias)
            head, self.read = quantized, Int8Linear(drafted)
        else:
            self.read = partial(F.linear, weight=drafted)
        self.head = head  # read(state): logits over the head's vocabulary ``[..., K]`` of states ``[..., H]``
        self.embed = embed
        self.hidden = torch.zeros(rows, embed.shape[1], dtype=dtype, device=device)
        self.expansion = expansion
        parents, self.depths = head_tree(expansion)
        self.parents = parents
        self.ancestors = ancestor_mask(parents)
        self.seconds = 0.0  # wall time drafting, which adaptive trees count as a step's drafting cost

    def remember(self, rows: list[int], hidden: torch.Tensor) -> None:
        """``hidden [B, H]``: the LLM's hidden state at each request's last verified node."""
        self.hidden[rows] = hidden.to(self.hidden.dtype)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], last: torch.Tensor, plan: Plan | None = None) -> TreeBatch:
        """Every request's tree (no plan applies: the head drafts for all, one call per level)."""
        start = time.perf_counter()
        b, dev = len(seqs), self.hidden.device
        state = self.hidden[[s.row for s in seqs]][:, None]  # [B, 1, H]
        tokens = last.to(dev)[:, None]
        found, confidence = [tokens], [torch.ones(b, 1, device=dev)]
        for k in self.expansion:
            state = self.head.step(state, self.embed[tokens])
            probs = torch.softmax(self.read(state).float(), dim=-1)
            top = probs.topk(k, dim=-1)
            tokens = self.head.vocab[top.indices].flatten(1)
            confidence.append(top.values.flatten(1))
            found.append(tokens)
            state = state.repeat_interleave(k, dim=1)
        tokens, confidence = torch.cat(found, 1).cpu(), torch.cat(confidence, 1).cpu()
        self.seconds += time.perf_counter() - start
        n = tokens.shape[1]
        own = torch.arange(n).expand(b, n)[:, :, None]
        return TreeBatch(tokens, self.parents.expand(b, n).clone(), self.depths.expand(b, n).clone(),
                         torch.ones(b, n, dtype=torch.bool), self.ancestors.expand(b, n, n).clone(), confidence,
                         (own > 0).long(), own.clone(), torch.ones(b, dtype=torch.bool), [None] * b)
