"""What a proposer is: something that drafts one token tree per running request."""
from __future__ import annotations

from typing import Protocol

from ..sequence import Sequence
from ..tree import Tree


class Proposer(Protocol):
    """Drafts, for each request, a tree rooted at its last token (``Tree.selected`` where the
    stochastic verifier must test candidates as one-hot draws); the engine merges the trees."""

    name: str

    def propose(self, seqs: list[Sequence]) -> list[Tree]: ...

    def retain(self, running: list[Sequence]) -> None:
        """Called after each step with the requests still running (drop the state of the others)."""
