"""Per-request state: tokens, where each model's cache stands, counters, stop conditions."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from .config import SamplingParams


@dataclass
class Sequence:
    request_id: int
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    generator: torch.Generator
    num_ssms: int = 0
    seed: int = 0  # the request's seed, or the one drawn at admission: the Gumbel noise's key
    row: int = -1  # cache row while running
    output: list[int] = field(default_factory=list)
    llm_len: int = 0  # committed slots in the LLM cache; the last token is never among them
    ssm_lens: list[int] = field(default_factory=list)
    llm_steps: int = 0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    accepted_by_proposer: Counter = field(default_factory=Counter)  # proposer name -> accepted draft tokens it proposed
    finish_reason: str | None = None  # "length", "stop", "cancelled" or "error" once finished
    error: str | None = None  # why this request failed alone (finish_reason "error")
    tree_sizes: list[int] = field(default_factory=list)  # tree tokens the LLM verified, per step
    log_probs: list[float] = field(default_factory=list)  # of the output tokens, where params.log_probs asks

    def __post_init__(self) -> None:
        self.ssm_lens = [0] * self.num_ssms

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def fail(self, exc: Exception) -> None:
        self.finish_reason, self.error = "error", f"{type(exc).__name__}: {exc}"

    def ends_with_stop_sequence(self) -> bool:
        out = self.output
        return any(len(s) <= len(out) and tuple(out[-len(s):]) == s for s in self.params.stop_sequences)

    def append(self, new: list[int]) -> int:
        """Add newly generated tokens up to ``max_tokens`` or a stop token; returns how many were kept."""
        kept = 0
        for tok in new:
            self.output.append(tok)
            kept += 1
            if tok in self.stop_ids or self.ends_with_stop_sequence():
                self.finish_reason = "stop"
                break
            if len(self.output) >= self.params.max_tokens:
                self.finish_reason = "length"
                break
        return kept
