"""The SSMs' caches after verification: each holds K/V for exactly the accepted tokens it proposed.

A bug here only lowers acceptance (an SSM drafting from wrong K/V), which output-parity tests cannot
see: the cache contents themselves are compared with a fresh prefill of the committed tokens."""
from __future__ import annotations

import torch

from conftest import prompts
from specinfer import SamplingParams, SpecInferEngine, TreeConfig
from specinfer.runner import ModelRunner, chain_batch


def fresh_kv(runner: ModelRunner, tokens: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every layer's K/V of ``tokens`` prefilled into an empty cache of the same model."""
    fresh = ModelRunner(runner.model, 1, runner.cache.slots, runner.attention, runner.invariant)
    fresh.forward([0], [0], chain_batch([tokens]))
    n = len(tokens)
    return [k[0, :n] for k in fresh.cache.k], [v[0, :n] for v in fresh.cache.v]


def test_two_merged_ssms_keep_exactly_their_accepted_tokens(models):
    engine = SpecInferEngine.from_pretrained(models["llm"], [models["close"], models["other"]],
                                             tree=TreeConfig(expansion=(2, 2, 1)), max_batch_size=4, max_context=64)
    seqs = [engine.new_sequence(p, SamplingParams(max_tokens=16, ignore_eos=True)) for p in prompts(4, seed=61)]
    for s in seqs:
        engine.add(s)
    grown = [0, 0]  # steps where an SSM committed more than its root for some request
    while engine.scheduler.has_work():
        before = [list(s.ssm_lens) for s in seqs]
        engine.step()
        for seq, was in zip(seqs, before):
            if seq.finished:
                continue
            for i, runner in enumerate(engine.ssms):
                n = seq.ssm_lens[i]
                assert n <= len(seq.tokens) - 1  # never the pending token, never a rejected one
                grown[i] += n - was[i] > 1 and was[i] > 0
                ks, vs = fresh_kv(runner, seq.tokens[:n])
                for layer, (k, v) in enumerate(zip(ks, vs)):
                    torch.testing.assert_close(runner.cache.k[layer][seq.row, :n], k, atol=1e-4, rtol=1e-4)
                    torch.testing.assert_close(runner.cache.v[layer][seq.row, :n], v, atol=1e-4, rtol=1e-4)
    assert all(g > 0 for g in grown), grown  # both SSMs had accepted drafts committed
    assert engine.stats.accepted_by_proposer["ssm"] > 0
