"""One model with its KV cache, run on ragged batches of nodes over committed prefixes.

Everything a model is asked to compute is "these nodes of a tree over this committed prefix":
a prompt or catch-up chunk is a chain, incremental decoding is a lone root, verification is the
whole speculated tree and SSM expansion is one level of it. ``layout`` turns that into cache slots
and what each node sees (``attention.py``); ``ModelRunner.forward`` runs it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .kernels.path_attention import available
from .model.attention import MASKS, Visibility
from .model.batch_invariance import KEY_BLOCK, round_up
from .cost_model import FixedCosts, ForwardCosts
from .model import Transformer
from .runtimes.base import CompiledModel


@dataclass
class NodeBatch:
    """Nodes to feed, per request row ``b``: token, node id in the tree region, depth, and which
    nodes of the region (``attend [B, T, N]``, self included) it sees. ``valid`` marks padding."""

    tokens: torch.Tensor  # [B, T]
    node_ids: torch.Tensor  # [B, T]
    depths: torch.Tensor  # [B, T]
    attend: torch.Tensor  # [B, T, N]
    valid: torch.Tensor  # [B, T]


def chain_batch(chunks: list[list[int]]) -> NodeBatch:
    """Causal chunks of different lengths (prompts, SSM catch-up) as chains."""
    t = max(len(c) for c in chunks)
    tokens = torch.zeros(len(chunks), t, dtype=torch.long)
    valid = torch.zeros(len(chunks), t, dtype=torch.bool)
    for b, chunk in enumerate(chunks):
        tokens[b, : len(chunk)] = torch.tensor(chunk, dtype=torch.long)
        valid[b, : len(chunk)] = True
    steps = torch.arange(t).expand(len(chunks), t)
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool)).expand(len(chunks), t, t)
    return NodeBatch(tokens, steps, steps, causal, valid)


def branches(nodes: NodeBatch) -> bool:
    """Whether a node's path is not its slots' order (a tree that branches): its attention takes the
    tree path, which costs more than a chain of as many tokens (``cost_model.ForwardCosts``)."""
    return bool(((nodes.depths != nodes.node_ids) & nodes.valid).any())


def layout(lengths: torch.Tensor, nodes: NodeBatch, attention: str,
           invariant: bool = False, paths: bool = False) -> tuple[torch.Tensor, torch.Tensor, Visibility]:
    """Positions, cache slots and visibility for ``nodes`` over prefixes of ``lengths [B]``.

    Node ``i`` of row ``b`` lives in slot ``lengths[b] + i`` at position ``lengths[b] + depth``;
    it sees the committed slots ``[0, lengths[b])`` and the region slots its ``attend`` row names,
    in the form the ``attention`` backend reads. Padding writes to the slot just past the region,
    which no real node uses. ``invariant``: the batch-invariant form of the attention
    (``batch_invariance.py``); ``paths``: its CPU kernel's (``kernels/path_attention.py``).
    """
    b, t, n = nodes.attend.shape
    scratch = (lengths + n)[:, None].expand(b, t)
    slots = torch.where(nodes.valid, lengths[:, None] + nodes.node_ids, scratch)
    positions = lengths[:, None] + nodes.depths
    region = nodes.attend & nodes.valid[:, :, None]
    return positions, slots, MASKS[attention].build(lengths, region, nodes.valid, invariant, paths)


class ModelRunner:
    """``batch_invariant``: the attention's form in which a token's result does not depend on the rest
    of the batch (``batch_invariance.py``; the model's linear layers pad themselves). Not for compiled
    models, which run their own kernels."""

    def __init__(self, model: Transformer, rows: int, slots: int, attention: str = "sdpa",
                 batch_invariant: bool = True) -> None:
        self.model = model
        self.attention = attention
        # a compiled model runs its own kernels (and TensorRT's profiles are sized by the unpadded slots)
        self.invariant = batch_invariant and not isinstance(model, CompiledModel)
        # an eager model skips the padding of ragged batches (``Packing``); compiled, graphed and
        # tensor-parallel ones run the padded shapes
        self.packs = isinstance(model, Transformer)
        self.cache = model.new_cache(rows, round_up(slots, KEY_BLOCK) if batch_invariant else slots)
        self.device = self.cache.batch_index.device  # the model's (a compiled one has no torch weights)
        layer = self.cache.k[0]
        # generated tokens attend through the CPU kernel; prompts keep the GEMMs (``path_attention.py``)
        self.paths = self.invariant and attention == "sdpa" and available(layer.dtype, layer.shape[-1], self.device)
        self.seconds = 0.0  # wall time spent in forwards, for the overhead figure of benchmarks
        self.costs: ForwardCosts | FixedCosts = ForwardCosts()  # what forwards cost here, by rows and tokens fed

    def forward(
        self, rows: list[int], lengths: list[int], nodes: NodeBatch, output_index: torch.Tensor | None = None,
        priced: bool = True, hidden: bool = False, prompt: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits at every fed node (``[B, T, V]``), or at ``output_index [B]`` only (``[B, V]``);
        ``hidden``: and the LLM's final hidden states there (an eager ``Transformer`` only).
        ``prompt``: the tokens are a prompt (the LLM's prefill), not generated ones: a role that picks
        the batch-invariant attention's form, so that a token's bits never depend on its batch.
        ``priced``: a forward of the kinds adaptive trees price (decoding, verifying, drafting), whose
        time teaches the cost curve; prompts are not (one row of many tokens costs unlike many rows
        of a few, at the same count)."""
        lens = torch.tensor(lengths, dtype=torch.long)
        width = int(lens.max()) + nodes.attend.shape[-1] + 1  # the region and the padding's scratch slot
        if width > self.cache.slots:
            raise ValueError(f"batch needs {width} cache slots, the cache has {self.cache.slots}")
        positions, slots, visibility = layout(lens, nodes, self.attention, self.invariant, self.paths and not prompt)
        dev = self.device
        start = time.perf_counter()
        inputs = (nodes.tokens.to(dev), positions.to(dev), self.cache, self.cache.rows_index(rows, dev),
                  slots.to(dev), visibility.to(dev), None if output_index is None else output_index.to(dev))
        extra = {"hidden": True} if hidden else {}
        logits = self.model(*inputs, valid=nodes.valid, **extra) if self.packs else self.model(*inputs, **extra)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start
        self.seconds += seconds
        if priced:
            self.costs.observe(self.tokens(nodes), seconds, branches(nodes), rows=len(rows))
        return logits

    def tokens(self, nodes: NodeBatch) -> int:
        """The token count a forward of ``nodes`` costs: its real tokens where the model skips padding."""
        return int(nodes.valid.sum()) if self.packs else nodes.tokens.numel()

    def commit(self, rows: list[int], lengths: torch.Tensor, nodes: torch.Tensor, counts: torch.Tensor) -> None:
        """Move each row's first ``counts [B]`` accepted region nodes (``nodes [B, L]``, root first)
        to the slots right after its prefix (``lengths [B]``), in one batched copy.

        Nodes already in place (a chain's accepted prefix always is) need no copy; most steps copy nothing."""
        place = torch.arange(nodes.shape[1])
        moved = (place < counts[:, None]) & (nodes != place)
        if not bool(moved.any()):
            return
        dst = lengths[:, None] + place
        src = torch.where(moved, lengths[:, None] + nodes, dst)  # the rest copies onto itself
        dev = self.device
        self.cache.move(torch.tensor(rows, device=dev), src.to(dev), dst.to(dev))
