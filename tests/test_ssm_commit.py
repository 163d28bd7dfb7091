"""The SSMs' caches after verification: each holds K/V for exactly the accepted tokens it proposed.

A bug here only lowers acceptance (an SSM drafting from wrong K/V), which output-parity tests cannot
see: the cache contents themselves are compared with a fresh prefill of the committed tokens."""
from __future__ import annotations

import torch

from conftest import prompts
from specinfer import SamplingParams, SpecInferEngine, TreeConfig
from specinfer.draft import fitting_groups
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
                if n == 0:
                    continue  # the SSM has not drafted for this request yet: it holds nothing of it
                ks, vs = fresh_kv(runner, seq.tokens[:n])
                for layer, (k, v) in enumerate(zip(ks, vs)):
                    torch.testing.assert_close(runner.cache.k[layer][seq.row, :n], k, atol=1e-4, rtol=1e-4)
                    torch.testing.assert_close(runner.cache.v[layer][seq.row, :n], v, atol=1e-4, rtol=1e-4)
    assert all(g > 0 for g in grown), grown  # both SSMs had accepted drafts committed
    assert engine.stats.accepted_by_proposer["ssm"] > 0


def test_catch_up_groups_keep_every_prefix_plus_chunk_within_the_cache():
    # a long prefix (a long-running request) and a long chunk (a prompt the SSM has not seen) split
    groups = fitting_groups([100, 0, 3], [2, 90, 1], slots=128)
    assert len(groups) == 2 and not any(0 in g and 1 in g for g in groups)
    assert fitting_groups([10, 0, 3], [2, 90, 1], slots=128) == [[0, 1, 2]]  # they fit: one forward
    for starts, lengths in (([5, 60, 0, 30], [40, 2, 64, 10]), ([0] * 4, [8] * 4)):
        groups = fitting_groups(starts, lengths, slots=128)
        assert sorted(i for g in groups for i in g) == list(range(4))
        assert all(max(starts[i] for i in g) + max(lengths[i] for i in g) + 1 <= 128 for g in groups)


def test_the_ssms_see_a_prompt_when_they_first_draft_beside_long_running_requests(models):
    """Prompts are not fed to the SSMs at admission: a 56-token prompt admitted while another request
    is over 72 tokens in does not fit one catch-up forward of a 128-slot cache; it is split, and the
    output stays the LLM's."""
    tree = TreeConfig(expansion=(1, 1), max_tree_tokens=3)  # cache rows of 124 + 3 + 1 = 128 slots
    engine = SpecInferEngine.from_pretrained(models["llm"], [models["close"]], tree=tree, max_batch_size=2,
                                             max_context=124)
    assert engine.ssms[0].cache.slots == 128
    long_prompt = prompts(1, seed=5, lo=56, hi=56)[0]
    requests = [(prompts(1, seed=3, lo=8, hi=8)[0], 110), (prompts(1, seed=4, lo=8, hi=8)[0], 64), (long_prompt, 12)]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in requests]
    reference = [r.token_ids for r in engine.generate([p for p, _ in requests], params, speculate=False)]
    seqs = [engine.new_sequence(p, q) for (p, _), q in zip(requests, params)]
    for s in seqs:
        engine.add(s)
    while engine.scheduler.has_work():
        engine.step()
        assert all(s.ssm_lens[0] == 0 for s in seqs if s.llm_steps == 1)  # admitted this step: not fed to the SSM
    assert [s.output for s in seqs] == reference
    assert seqs[2].ssm_lens[0] >= len(long_prompt)  # its prompt did reach the SSM later
