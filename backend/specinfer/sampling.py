"""Sampling as pure functions: the target distribution every decoder and verifier works with."""
from __future__ import annotations

import torch

from .config import SamplingParams


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Distribution after temperature, then top-k, then top-p (the order of HF ``generate``).

    ``logits`` is ``[..., V]``; returns float32 probabilities of the same shape. Only for
    ``temperature > 0``: greedy decoding takes the argmax of the raw logits.
    """
    scores = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


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


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A per-request generator: the same seed gives the same output whatever else is batched."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen
