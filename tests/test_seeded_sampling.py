"""Gumbel-max sampling reproduces: a seed fixes a sampled request's tokens whatever the tree, batch or load.

Each output position k of a request is the argmax of its target scores plus noise keyed by (seed, k)
(``noise.py``), so speculative decoding (greedy verification of those samples) must return exactly
the tokens of incremental decoding: for every tree shape, alone and among other requests of other
lengths and settings. The tiny models' logits are far apart, so float rounding between differently
batched forwards cannot flip an argmax here.
"""
from __future__ import annotations

import pytest

from conftest import prompts
from specinfer import SamplingParams, SpecInferEngine, TreeConfig
from specinfer.cost_model import FixedCosts

TREES = {"chain": (1, 1, 1, 1), "paper": (1, 1, 3, 1), "wide": (2, 2, 1)}
TARGET = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=2**63 + 11, max_tokens=24, ignore_eos=True)
PROMPT = prompts(1, seed=90)[0]


def others(n: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """Requests of other lengths and settings (greedy, other seeds, penalties) to share the batch."""
    params = [SamplingParams(temperature=[1.0, 0.0, 0.6][i % 3], top_p=0.9, seed=i, max_tokens=5 + 7 * i,
                             repetition_penalty=1.0 + 0.1 * (i % 2), ignore_eos=True) for i in range(n)]
    return prompts(n, seed=91, hi=20), params


def gumbel_engine(models, ssms, expansion, adaptive=False, batch=8):
    """Adaptive trees get free verification: every step verifies the whole selected tree."""
    tree = TreeConfig(expansion=expansion, verifier="gumbel", adaptive=adaptive)
    engine = SpecInferEngine.from_pretrained(models["llm"], [models[s] for s in ssms], tree=tree, max_batch_size=batch)
    if adaptive:
        engine.llm.costs = FixedCosts(lambda n: 1.0)
        for runner in engine.ssms:
            runner.costs = FixedCosts(lambda n: 0.0)
    return engine


@pytest.fixture(scope="module")
def incremental(models):
    """The target request's tokens from incremental Gumbel-max decoding, alone."""
    engine = gumbel_engine(models, [], (1,), batch=1)
    return engine.generate([PROMPT], TARGET, speculate=False)[0].token_ids


@pytest.mark.parametrize("tree, ssms, adaptive", [(t, ["close"], False) for t in sorted(TREES)] + [
    ("paper", ["close", "other"], False), ("paper", ["close"], True), ("wide", ["close", "other"], True)])
def test_speculative_equals_incremental_alone_and_in_a_batch(models, incremental, tree, ssms, adaptive):
    engine = gumbel_engine(models, ssms, TREES[tree], adaptive)
    alone = engine.generate([PROMPT], TARGET)[0]
    assert alone.token_ids == incremental
    prompts_, params = others(7)
    batch = engine.generate(prompts_[:3] + [PROMPT] + prompts_[3:], params[:3] + [TARGET] + params[3:])
    assert batch[3].token_ids == incremental
    assert batch[3].seed == TARGET.seed
    plain = engine.generate(prompts_[:3] + [PROMPT] + prompts_[3:], params[:3] + [TARGET] + params[3:],
                            speculate=False)
    assert [r.token_ids for r in batch] == [r.token_ids for r in plain]  # every request, greedy or sampled
    assert sum(r.accepted_draft_tokens for r in batch) > 0  # speculation did happen


def test_other_seeds_give_other_tokens(models, incremental):
    engine = gumbel_engine(models, ["close"], TREES["paper"])
    outputs = {tuple(r.token_ids) for r in engine.generate([PROMPT] * 4, [
        SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=s, max_tokens=24, ignore_eos=True)
        for s in range(4)])}
    assert len(outputs) == 4 and tuple(incremental) not in outputs


def test_a_drawn_seed_is_reported_and_reproduces(models):
    engine = gumbel_engine(models, ["close"], TREES["paper"])
    unseeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    first, second = engine.generate([PROMPT, PROMPT], unseeded)
    assert first.seed != second.seed  # drawn per request at admission
    again = engine.generate([PROMPT], SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=first.seed),
                            speculate=False)[0]
    assert again.token_ids == first.token_ids


def test_mss_engines_report_their_drawn_seed_too(models):
    engine = SpecInferEngine.from_pretrained(models["llm"], [models["close"]], tree=TreeConfig(expansion=(1, 2)))
    r = engine.generate([PROMPT], SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True))[0]
    again = engine.generate([PROMPT], SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=r.seed))[0]
    assert again.token_ids == r.token_ids


def test_a_request_with_no_allowed_token_fails_alone(models, incremental):
    engine = gumbel_engine(models, ["close"], TREES["paper"])
    everything = SamplingParams(temperature=1.0, max_tokens=4, bad_sequences=tuple((t,) for t in range(96)))
    with pytest.raises(RuntimeError, match="no token has a finite score"):
        engine.generate([PROMPT, PROMPT], [everything, TARGET])
    assert engine.generate([PROMPT], TARGET)[0].token_ids == incremental  # the engine stays usable
