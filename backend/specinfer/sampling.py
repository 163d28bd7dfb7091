"""Sampling as pure functions: the target distribution every decoder and verifier works with."""
from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from .config import SamplingParams
from .noise import as_int64, gumbel


def target_scores(logits: torch.Tensor, params: Seq[SamplingParams]) -> torch.Tensor:
    """Logits after temperature, then top-k, then top-p (the order of HF ``generate``), ``-inf``
    outside the kept support: their softmax is the target distribution.

    ``logits [B, ..., V]`` with one parameter set per leading row (requests batched with their own
    settings); float32 out. Only for ``temperature > 0``: greedy decoding takes the argmax of the raw
    logits. Each row is computed on its own, so a request's scores do not depend on its batch.
    """
    shape = (-1,) + (1,) * (logits.dim() - 1)
    column = lambda values, dtype: torch.tensor(values, dtype=dtype, device=logits.device).view(shape)  # noqa: E731
    scores = logits.float() / column([p.temperature for p in params], torch.float32)
    vocab = scores.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    top_p = [p.top_p if p.top_p < 1.0 else float("inf") for p in params]  # 1: no filter, whatever the rounding
    if not any(top_k) and min(top_p) == float("inf"):
        return scores
    ordered, order = torch.sort(scores, dim=-1, descending=True)
    if any(top_k):
        kth = ordered.gather(-1, (column(top_k, torch.long) - 1).clamp(min=0).expand(*scores.shape[:-1], 1))
        kth = torch.where(column(top_k, torch.long) > 0, kth, torch.tensor(float("-inf"), device=logits.device))
        ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop = (mass_before >= column(top_p, torch.float32)) | (ordered == float("-inf"))
    return scores.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One request's target distribution: ``logits [..., V]`` -> float32 probabilities, same shape."""
    return torch.softmax(target_scores(logits[None], [params])[0], dim=-1)


def first_max(x: torch.Tensor) -> torch.Tensor:
    """Index of the largest value along the last dimension, the first of equal ones, as ``torch.argmax``
    gives it: ``max``'s indices, which PyTorch's CPU kernels compute 3-5x faster (1 x 9 x 49,152
    logits: bfloat16 0.17 against 0.77 ms, float32 0.10 against 0.30 ms). Every greedy choice and
    Gumbel-max draw goes through it, so plain decoding and verification break ties alike."""
    return x.max(dim=-1).indices


def gumbel_choice(scores: torch.Tensor, seeds: Seq[int], first: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
    """Gumbel-max sampling: ``argmax(scores + gumbel(seed, position))`` is a draw from
    ``softmax(scores)``, and the same draw wherever (seed, position) recurs: in incremental decoding,
    at any tree node, in any batch. ``scores [B, N, V]`` (``target_scores``) at nodes of ``depths
    [B, N]``; a node at depth d samples output position ``first[b] + d`` (nodes of one depth share
    their noise). Returns the chosen ids ``[B, N]``."""
    device = scores.device
    seeds_t = torch.tensor([as_int64(s) for s in seeds], dtype=torch.long)
    depths = depths.to(device)
    positions = first.to(device)[:, None] + torch.arange(int(depths.max()) + 1, device=device)
    noise = gumbel(seeds_t, positions, scores.shape[-1])  # [B, D + 1, V]
    rows = torch.arange(len(seeds), device=device)[:, None]
    return first_max(scores.double() + noise[rows, depths])


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token id drawn from a ``[V]`` distribution."""
    return int(torch.multinomial(probs, 1, generator=generator).item())


def draw_children(
    probs: torch.Tensor, k: int, replacement: bool, generator: torch.Generator | None
) -> list[int]:
    """``k`` draft tokens from ``probs``: i.i.d. (duplicates kept), or distinct without replacement.

    Without replacement the tokens come in draw order (each drawn from ``probs`` renormalised over
    the tokens not drawn yet): the verifier must test them in that order, because such draws are not
    exchangeable. Fewer than ``k`` come back when ``probs`` has fewer non-zero entries.
    """
    if replacement:
        return torch.multinomial(probs, k, replacement=True, generator=generator).tolist()
    remaining = probs.clone()
    drawn: list[int] = []
    for _ in range(min(k, int((probs > 0).sum()))):
        tok = int(torch.multinomial(remaining, 1, generator=generator))
        drawn.append(tok)
        remaining[tok] = 0.0
    return drawn


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A per-request generator for the multinomial draws of drafting and MSS / naive verification."""
    return torch.Generator(device=device).manual_seed(seed)
