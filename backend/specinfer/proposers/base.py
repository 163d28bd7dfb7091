"""What a proposer is: something that drafts one token tree per running request, as one batch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..sequence import Sequence
from ..tree import TreeBatch


@dataclass(frozen=True)
class Plan:
    """What a step asks of the proposers that cost model forwards: the requests ``chosen [B]`` to
    draft for, ``depth`` levels deep (0: none). Model-free proposers draft for every request."""

    chosen: torch.Tensor
    depth: int


class Proposer(Protocol):
    """Drafts, for each request, a tree rooted at its last token (``last [B]``), as one ``TreeBatch``
    with one proposer column (selected trees where the stochastic verifier must test candidates as
    one-hot draws); the engine merges the proposers' batches."""

    name: str

    def propose(self, seqs: list[Sequence], last: torch.Tensor, plan: Plan) -> TreeBatch: ...
