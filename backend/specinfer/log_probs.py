"""Log-probabilities of the emitted tokens under the LLM's target distribution (``return_log_probs``).

The target is the distribution the token was verified or drawn against: the LLM's logits after the
context-dependent changes (``logits_processors.py``), then softmax for greedy requests, or
temperature / top-k / top-p for sampled ones. Speculation does not change it: the log-probability of
an accepted draft token is read at its parent node, that of the bonus token at the last accepted node,
so speculative and incremental decoding report the same values for the same tokens.
"""
from __future__ import annotations

import torch

from .config import SamplingParams
from .sampling import target_probs
from .sequence import Sequence


def target_log_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``[N, V]`` log-probabilities of the target distribution at ``N`` nodes."""
    if params.greedy:
        return torch.log_softmax(logits.float(), dim=-1)
    return torch.log(target_probs(logits, params))


def record(seq: Sequence, logits: torch.Tensor, tokens: list[int], kept: int) -> None:
    """Append the log-probabilities of the ``kept`` first of the emitted ``tokens``, each read at the
    node before it (``logits [K, V]``: the root, then the accepted nodes)."""
    if not seq.params.log_probs or kept == 0:
        return
    lp = target_log_probs(logits[:kept], seq.params).cpu()
    seq.log_probs += [float(lp[i, t]) for i, t in enumerate(tokens[:kept])]
