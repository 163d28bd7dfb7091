"""Continuous batching: joining, leaving, aborting, stop sequences, engine counters."""
from __future__ import annotations

import pytest

from conftest import prompts
from specinfer import SamplingParams, SpecInferEngine, TreeConfig


@pytest.fixture()
def engine(models):
    return SpecInferEngine.from_pretrained(models["llm"], [models["close"]], tree=TreeConfig(expansion=(1, 2, 1)),
                                           max_batch_size=2)


def test_requests_wait_for_a_row_and_join_between_iterations(engine):
    seqs = [engine.new_sequence(p, SamplingParams(max_tokens=8, ignore_eos=True)) for p in prompts(3, seed=50)]
    for s in seqs:
        engine.add(s)
    engine.step()
    assert [s.row >= 0 for s in seqs] == [True, True, False]  # the third waits: two rows
    while not seqs[2].output:
        engine.step()
    assert seqs[2].row in (seqs[0].row, seqs[1].row)  # it took a row somebody left
    while engine.scheduler.has_work():
        engine.step()
    assert all(len(s.output) == 8 for s in seqs)
    assert engine.stats.verify_requests > engine.stats.verify_forwards  # some forwards were shared


def test_abort_frees_the_row_and_the_rest_is_unaffected(engine):
    batch = prompts(3, seed=51)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    expected = [r.token_ids for r in engine.generate(batch, params, speculate=False)]
    seqs = [engine.new_sequence(p, params) for p in batch]
    for s in seqs:
        engine.add(s)
    engine.step()
    engine.abort(seqs[0])  # running
    engine.abort(seqs[2])  # still waiting
    assert seqs[2] not in engine.scheduler.waiting
    engine.step()
    assert seqs[0] not in engine.scheduler.running and len(engine.scheduler.free_rows) >= 1
    while engine.scheduler.has_work():
        engine.step()
    assert seqs[1].output == expected[1]
    assert seqs[0].finish_reason == seqs[2].finish_reason == "cancelled"
    assert sorted(engine.scheduler.free_rows) == [0, 1]


def test_stop_sequences_end_generation_after_the_sequence(engine):
    batch = prompts(4, seed=52)
    full = [r.token_ids for r in engine.generate(batch, SamplingParams(max_tokens=20, ignore_eos=True))]
    for ids, prompt in zip(full, batch):
        stop = tuple(ids[6:8])
        cut = next(i for i in range(2, len(ids) + 1) if tuple(ids[i - 2:i]) == stop)
        r = engine.generate([prompt], SamplingParams(max_tokens=20, ignore_eos=True, stop_sequences=(stop,)))[0]
        assert r.token_ids == ids[:cut] and r.finish_reason == "stop"
    with pytest.raises(ValueError, match="empty sequence"):
        SamplingParams(stop_sequences=((),))


def test_engine_stats_account_for_every_step(engine):
    results = engine.generate(prompts(5, seed=53), SamplingParams(max_tokens=15, ignore_eos=True))
    stats = engine.stats
    assert sum(stats.accepted_lengths.values()) == stats.verify_requests
    assert sum(n * c for n, c in stats.accepted_lengths.items()) >= sum(r.accepted_draft_tokens for r in results)
    assert 0 < stats.forward_seconds < stats.step_seconds


def test_stats_snapshots_differ_by_what_happened_between_them(engine):
    """What a serving loop reports per step: a snapshot stays as it was, and the difference of two is
    the forwards, requests and trees of the calls between them."""
    engine.generate(prompts(3, seed=54), SamplingParams(max_tokens=6, ignore_eos=True))  # earlier work
    before = engine.stats_snapshot()
    assert sum(before.tree_sizes.values()) == before.verify_requests > 0
    results = engine.generate(prompts(2, seed=55), SamplingParams(max_tokens=9, ignore_eos=True))
    after = engine.stats_snapshot()
    assert sum(before.tree_sizes.values()) == before.verify_requests  # the snapshot did not grow with the engine
    assert after.prefill_forwards - before.prefill_forwards == 1  # both prompts in one prefill (two rows)
    verified = sum(r.llm_steps - 1 for r in results)  # every step after the prefill verified a tree
    assert after.verify_requests - before.verify_requests == verified
    assert max(r.llm_steps for r in results) - 1 == after.verify_forwards - before.verify_forwards
    assert sum((after.tree_sizes - before.tree_sizes).values()) == verified
    assert sum(n * c for n, c in (after.tree_sizes - before.tree_sizes).items()) == sum(r.draft_tokens for r in results) + verified
    assert 0 < after.forward_seconds - before.forward_seconds < after.step_seconds - before.step_seconds


def test_long_prompt_joining_a_long_running_request_fits_the_cache(models):
    """Regression: the new request's prompt used to reach the SSM in the same catch-up forward as
    the running request's few tokens, needing (its length + the prompt) slots: past the cache."""
    tree = TreeConfig(expansion=(1, 2), max_tree_tokens=8)
    engine = SpecInferEngine.from_pretrained(models["llm"], [models["close"]], tree=tree, max_batch_size=2,
                                             max_context=64, batch_invariant=False)  # no slots rounded up to 512
    assert engine.ssms[0].cache.slots == 64 + 8 + 1
    first, second = prompts(2, seed=56, lo=4, hi=4)[0], prompts(1, seed=57, lo=50, hi=50)[0]
    params = [SamplingParams(max_tokens=58, ignore_eos=True), SamplingParams(max_tokens=12, ignore_eos=True)]
    expected = [r.token_ids for r in engine.generate([first, second], params, speculate=False)]
    a = engine.new_sequence(first, params[0])
    engine.add(a)
    while len(a.output) < 40:
        engine.step()
    b = engine.new_sequence(second, params[1])
    engine.add(b)
    while engine.scheduler.has_work():
        engine.step()
    assert [a.output, b.output] == expected
