"""Tensor-parallel LLM on CPU (gloo, 2 ranks): logits equal to one process, engine output, bad sizes."""
from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import LlamaForCausalLM

from conftest import make_llama, prompts
from specinfer import SamplingParams, SpecInferEngine, TreeConfig
from specinfer.model import Transformer
from specinfer.parallel import TensorParallelLLM
from specinfer.parallel.shard import valid_sizes
from specinfer.runner import ModelRunner, NodeBatch, chain_batch
from specinfer.tree import pad_trees, path_to
from test_tree_attention import random_tree

VARIANTS = {
    "gqa_untied": {},  # 4 query heads, 2 KV heads: one KV head per rank
    "kv_replicated_tied": dict(num_key_value_heads=1, tie_word_embeddings=True),  # fewer KV heads than ranks
    "odd_vocab_bias": dict(vocab=97, attention_bias=True, mlp_bias=True),  # vocabulary padded to 2 x 49
}


def randomize_biases(folder):
    """``transformers`` initialises biases to zero, which would hide where a rank adds its bias."""
    model = LlamaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    return folder


def same_on_both(one: ModelRunner, two: ModelRunner, rows, lengths, nodes: NodeBatch, **kwargs) -> torch.Tensor:
    """The real tokens' logits (the padding's: zeros where a model skips it, whatever the padded forward gives otherwise)."""
    a, b = one.forward(rows, lengths, nodes, **kwargs), two.forward(rows, lengths, nodes, **kwargs)
    assert a.shape == b.shape
    real = nodes.valid if "output_index" not in kwargs else slice(None)
    torch.testing.assert_close(b[real], a[real], rtol=1e-4, atol=1e-4)
    return a


@pytest.mark.parametrize("variant, attention", [(v, "sdpa") for v in sorted(VARIANTS)] + [("gqa_untied", "triton")])
def test_two_ranks_give_the_logits_of_one(tmp_path, variant, attention):
    """Prefill, tree verification, the commit of accepted nodes and decoding over a ragged batch; with
    ``triton`` the workers receive the packed tree mask instead of the dense one."""
    folder = make_llama(tmp_path / variant, seed=21, **VARIANTS[variant])
    if VARIANTS[variant].get("attention_bias"):
        randomize_biases(folder)
    tp = TensorParallelLLM(folder, 2)
    try:
        one = ModelRunner(Transformer.from_pretrained(folder), rows=5, slots=96, attention=attention)
        two = ModelRunner(tp, rows=5, slots=96, attention=attention)
        g = torch.Generator().manual_seed(5)
        rows = [4, 0, 2]  # scattered rows: an index tensor; [1, 2] below: a slice
        prefixes = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (1, 17, 40)]
        last = torch.tensor([len(p) - 1 for p in prefixes])
        same_on_both(one, two, rows, [0, 0, 0], chain_batch(prefixes), prompt=True)
        same_on_both(one, two, [1, 2], [0, 0], chain_batch(prefixes[:2]), output_index=last[:2], prompt=True)
        trees = [random_tree(n, g) for n in (12, 1, 7)]
        batch = pad_trees(trees)
        b, n = batch.tokens.shape
        nodes = NodeBatch(batch.tokens, torch.arange(n).expand(b, n), batch.depths, batch.ancestors, batch.valid)
        lengths = [len(p) for p in prefixes]
        same_on_both(one, two, rows, lengths, nodes)
        paths = [[0] + path_to(t.parents.tolist(), int(torch.argmax(t.depths))) for t in trees]
        accepted = pad_sequence([torch.tensor(p) for p in paths], batch_first=True)
        counts = torch.tensor([len(p) for p in paths])
        one.commit(rows, torch.tensor(lengths), accepted, counts)
        two.commit(rows, torch.tensor(lengths), accepted, counts)
        lengths = [length + len(p) for length, p in zip(lengths, paths)]
        same_on_both(one, two, rows, lengths, chain_batch([[5], [6], [7]]))
    finally:
        tp.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_ranks_give_a_token_the_same_logits_alone_and_in_a_tree(tmp_path, dtype):
    """Batch invariance over ranks: a token decoded alone, as the root of a tree and beside another
    request gives the same logits bit for bit, so greedy speculation stays exact with a sharded LLM:
    the workers rebuild the leader's invariant attention (they attended with SDPA before, whose
    rounding follows the number of queries)."""
    folder = make_llama(tmp_path / "wide", seed=5, vocab=512, hidden_size=256, intermediate_size=512,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=2048, initializer_range=0.02)
    tp = TensorParallelLLM(folder, 2, dtype=dtype)
    try:
        g = torch.Generator().manual_seed(7)
        prefix, other = torch.randint(0, 512, (300,), generator=g).tolist(), torch.randint(0, 512, (140,), generator=g).tolist()
        views = []
        for shape in ("alone", "tree", "beside"):
            runner = ModelRunner(tp, rows=2, slots=512)
            chunks = [prefix] + ([other] if shape == "beside" else [])
            runner.forward(list(range(len(chunks))), [0] * len(chunks), chain_batch(chunks), prompt=True)
            if shape == "tree":
                tree = random_tree(13, g)
                tree.tokens[0] = 11
                batch = pad_trees([tree])
                nodes = NodeBatch(batch.tokens, torch.arange(13)[None], batch.depths, batch.ancestors, batch.valid)
            else:
                nodes = chain_batch([[11]] * len(chunks))
            views.append(runner.forward(list(range(len(chunks))), [len(c) for c in chunks], nodes)[0, 0])
        assert torch.equal(views[1], views[0]) and torch.equal(views[2], views[0])
    finally:
        tp.close()


def test_a_size_the_heads_do_not_allow_is_refused(tmp_path):
    folder = make_llama(tmp_path / "m", seed=1, num_attention_heads=4, num_key_value_heads=2)
    assert valid_sizes(Transformer.from_pretrained(folder).args) == [1, 2, 4]
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 .* sizes that work are \[1, 2, 4\]"):
        SpecInferEngine.from_pretrained(folder, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
        SpecInferEngine.from_pretrained(folder, tensor_parallel_size=0)


@pytest.fixture(scope="module")
def tp_engine(models):
    engine = SpecInferEngine.from_pretrained(models["llm"], [models["close"]], tree=TreeConfig(expansion=(1, 2, 1)),
                                             tensor_parallel_size=2)
    yield engine
    engine.close()


def test_greedy_speculative_equals_incremental_and_hugging_face(models, tp_engine):
    batch = prompts(4, seed=7)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    spec = tp_engine.generate(batch, params, speculate=True)
    inc = tp_engine.generate(batch, params, speculate=False)
    hf = LlamaForCausalLM.from_pretrained(models["llm"]).eval()
    for seq, s, i in zip(batch, spec, inc):
        with torch.no_grad():
            out = hf.generate(torch.tensor([seq]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert s.token_ids == i.token_ids == out[0, len(seq):].tolist()
    assert sum(r.accepted_draft_tokens for r in spec) > 0  # the trees were verified, not just roots


def test_sampled_output_is_reproducible_for_a_seed(tp_engine):
    batch = prompts(3, seed=8)
    params = [SamplingParams(max_tokens=12, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    first = [r.token_ids for r in tp_engine.generate(batch, params)]
    assert first == [r.token_ids for r in tp_engine.generate(batch, params)]
    assert len({tuple(t) for t in first}) == 3


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL: one GPU per rank)")
def test_nccl_ranks_give_the_greedy_output_of_one_gpu(models):
    """The CUDA path (NCCL data group, the tree-attention kernel): not run yet, no multi-GPU machine."""
    batch = prompts(4, seed=7)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    one = SpecInferEngine.from_pretrained(models["llm"], [models["close"]], tree=TreeConfig(expansion=(1, 2, 1)),
                                          device="cuda")
    want = [r.token_ids for r in one.generate(batch, params)]
    with SpecInferEngine.from_pretrained(models["llm"], [models["close"]], tree=TreeConfig(expansion=(1, 2, 1)),
                                         device="cuda", tensor_parallel_size=2) as two:
        assert [r.token_ids for r in two.generate(batch, params)] == want
