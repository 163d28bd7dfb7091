"""Draft proposers behind one interface (``base.Proposer``); the SSMs' expansion drafting is ``draft.py``."""
from .base import Proposer
from .suffix import SuffixIndex, SuffixProposer, grow_tree

__all__ = ["Proposer", "SuffixIndex", "SuffixProposer", "grow_tree"]
