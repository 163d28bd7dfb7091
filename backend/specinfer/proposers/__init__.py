"""Draft proposers behind one interface (``base.Proposer``): the SSMs' expansion trees (``ssm.py``,
drafting in ``draft.py``) and the suffix proposer's trees from text already seen (``suffix.py``)."""
from .base import Plan, Proposer
from .ssm import SsmProposer
from .suffix import SuffixIndex, SuffixProposer, grow_tree

__all__ = ["Plan", "Proposer", "SsmProposer", "SuffixIndex", "SuffixProposer", "grow_tree"]
