"""Context-dependent changes of the LLM's target distribution: bad words, ``min_length``, penalties.

They are applied to the LLM's logits at every tree node from that node's own context (the committed
tokens plus the drafted path from the root to the node) and, identically, in incremental decoding
(where the tree is its root alone), before greedy argmax or temperature / top-k / top-p. Verification
then keeps the speculative output equal to the incremental one (greedy) or distributed as the changed
target (sampling): speculation never sees a distribution that incremental decoding would not.

Semantics (those of TensorRT-LLM and Hugging Face where they agree):
- ``repetition_penalty`` r over every token of the context (prompt + output): a logit l becomes
  l / r where l > 0, l * r otherwise.
- ``presence_penalty`` p and ``frequency_penalty`` f over the output tokens: l - p - f * count.
- ``min_length``: while fewer than ``min_length`` tokens are generated, the stop tokens (EOS,
  ``end_id``, ``stop_token_ids``) cannot be drawn.
- ``bad_sequences``: a token that would complete a bad sequence (the context ending with all but
  its last token) cannot be drawn; a one-token bad word is never drawn.
"""
from __future__ import annotations

import torch

from .sequence import Sequence
from .tree import Tree, TreeBatch, path_to


def changes_logits(seq: Sequence) -> bool:
    p = seq.params
    return bool(p.bad_sequences or p.min_length > 0 or p.repetition_penalty != 1.0 or p.presence_penalty
                or p.frequency_penalty)


def process(logits: torch.Tensor, seq: Sequence, paths: list[list[int]]) -> torch.Tensor:
    """``logits [N, V]`` at nodes whose drafted tokens after the committed ones are ``paths``."""
    p = seq.params
    out = logits.clone()
    for i, path in enumerate(paths):
        output = seq.output + path
        context = seq.prompt + output
        row = out[i]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(context)), device=row.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and output:
            toks, counts = torch.unique(torch.tensor(output, device=row.device), return_counts=True)
            row[toks] -= p.presence_penalty + p.frequency_penalty * counts.to(row.dtype)
        banned = [s[-1] for s in p.bad_sequences if len(s) <= len(context) + 1
                  and (len(s) == 1 or context[-(len(s) - 1):] == list(s[:-1]))]
        if len(output) < p.min_length:
            banned += list(seq.stop_ids)
        if banned:
            row[torch.tensor(banned, device=row.device)] = float("-inf")
    return out


def tree_paths(tree: Tree) -> list[list[int]]:
    """For every node, the drafted tokens from the root's child down to it (the root: none)."""
    parents, tokens = tree.parents.tolist(), tree.tokens.tolist()
    return [[tokens[n] for n in path_to(parents, node)] for node in range(tree.size)]


def process_batch(logits: torch.Tensor, seqs: list[Sequence], batch: TreeBatch) -> torch.Tensor:
    """The LLM's ``[B, N, V]`` logits over padded trees, changed for the requests that ask for it."""
    todo = [b for b, seq in enumerate(seqs) if changes_logits(seq)]
    if not todo:
        return logits
    logits = logits.clone()
    for b in todo:
        tree = batch.tree(b)
        logits[b, : tree.size] = process(logits[b, : tree.size], seqs[b], tree_paths(tree))
    return logits
