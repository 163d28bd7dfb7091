"""Draft proposers behind one interface (``base.Proposer``): the SSMs' expansion trees (``ssm.py``,
drafting in ``draft.py``), the suffix proposer's trees from text already seen (``suffix.py``) and
the draft head's from the LLM's last hidden state (``head.py``)."""
from .base import Plan, Proposer
from .head import DraftHead, HeadProposer
from .ssm import SsmProposer
from .suffix import SuffixIndex, SuffixProposer, grow_tree

__all__ = ["DraftHead", "HeadProposer", "Plan", "Proposer", "SsmProposer", "SuffixIndex", "SuffixProposer", "grow_tree"]
