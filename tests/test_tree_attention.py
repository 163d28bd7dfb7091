"""Tree-parallel decoding: one forward over a batch of trees equals incremental decoding of every path."""
from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import LlamaForCausalLM

from conftest import VOCAB
from specinfer.model import Transformer
from specinfer.runner import ModelRunner, NodeBatch, chain_batch
from specinfer.tree import TreeBuilder, pad_trees, path_to


def random_tree(size: int, g: torch.Generator):
    b = TreeBuilder(int(torch.randint(3, VOCAB, (1,), generator=g)))
    while len(b.tokens) < size:
        parent = int(torch.randint(0, len(b.tokens), (1,), generator=g))
        b.add(parent, int(torch.randint(3, VOCAB, (1,), generator=g)))
    return b.build()


def hf_last_logits(hf, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([seq])).logits[0, -1]


def test_tree_logits_equal_incremental_decoding_of_each_path(models):
    g = torch.Generator().manual_seed(11)
    hf = LlamaForCausalLM.from_pretrained(models["llm"]).eval()
    runner = ModelRunner(Transformer.from_pretrained(models["llm"]), rows=6, slots=128)
    rows = [4, 0, 2, 5]  # rows need not be contiguous or ordered
    prefixes = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (1, 9, 23, 40)]
    runner.forward(rows, [0] * 4, chain_batch(prefixes), prompt=True)
    trees = [random_tree(n, g) for n in (30, 1, 12, 21)]
    batch = pad_trees(trees)
    b, n = batch.tokens.shape
    nodes = NodeBatch(batch.tokens, torch.arange(n).expand(b, n), batch.depths, batch.ancestors, batch.valid)
    logits = runner.forward(rows, [len(p) for p in prefixes], nodes)
    checked = 0
    for i, (prefix, tree) in enumerate(zip(prefixes, trees)):
        parents = tree.parents.tolist()
        for node in range(tree.size):
            seq = prefix + tree.tokens[[0] + path_to(parents, node)].tolist()
            torch.testing.assert_close(logits[i, node], hf_last_logits(hf, seq), rtol=1e-4, atol=1e-4)
            checked += 1
    assert checked == sum(t.size for t in trees)

    # Commit one path per request: the next token must see exactly prefix + path, with no recompute.
    paths = []
    for tree in trees:
        deepest = int(torch.argmax(tree.depths))
        paths.append([0] + path_to(tree.parents.tolist(), deepest))
    lengths = [len(p) for p in prefixes]
    nodes = pad_sequence([torch.tensor(p) for p in paths], batch_first=True)
    runner.commit(rows, torch.tensor(lengths), nodes, torch.tensor([len(p) for p in paths]))
    nxt = torch.randint(3, VOCAB, (4,), generator=g).tolist()
    after = runner.forward(rows, [l + len(p) for l, p in zip(lengths, paths)], chain_batch([[t] for t in nxt]))
    for i, (prefix, tree, path) in enumerate(zip(prefixes, trees, paths)):
        seq = prefix + tree.tokens[path].tolist() + [nxt[i]]
        torch.testing.assert_close(after[i, 0], hf_last_logits(hf, seq), rtol=1e-4, atol=1e-4)
