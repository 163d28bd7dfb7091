"""The SSM proposer: one small model's expansion-based trees (``draft.py``) behind ``Proposer``."""
from __future__ import annotations

import torch

from ..config import TreeConfig
from ..draft import draft_selected, draft_trees
from ..runner import ModelRunner
from ..sequence import Sequence
from ..tree import TreeBatch, pad_trees, root_only, roots
from .base import Plan


class SsmProposer:
    """SSM number ``index``'s trees: selected candidates as tensors over the batch, sampled ones per
    request; its cache row of a request holds what it has seen of that request (``Sequence.ssm_lens``)."""

    name = "ssm"

    def __init__(self, runner: ModelRunner, index: int, tree: TreeConfig) -> None:
        self.runner, self.index, self.tree = runner, index, tree

    def propose(self, seqs: list[Sequence], last: torch.Tensor, plan: Plan) -> TreeBatch:
        """``plan.depth`` levels deep for the requests ``plan.chosen``, lone roots for the others."""
        picked = plan.chosen.nonzero().flatten().tolist()
        if not picked or not plan.depth:
            return roots(last, 1)
        if self.tree.selected or all(seqs[i].params.greedy for i in picked):
            return draft_selected(self.runner, seqs, plan.chosen, self.index, self.tree, plan.depth, last)
        trees = [root_only(int(t)) for t in last.tolist()]
        drafted = draft_trees(self.runner, [seqs[i] for i in picked], self.index, self.tree, plan.depth)
        for i, tree in zip(picked, drafted):
            trees[i] = tree
        return pad_trees(trees)
