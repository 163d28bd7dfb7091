"""Bad words, min_length and penalties change the target identically in speculative and incremental
decoding: greedy speculative output equals incremental output under the same settings."""
from __future__ import annotations

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from conftest import prompts
from specinfer import SamplingParams, SpecInferEngine, TreeConfig
from specinfer.logits_processors import process
from specinfer.sampling import make_generator
from specinfer.sequence import Sequence

PROMPTS = prompts(8, seed=5)


@pytest.fixture(scope="module")
def engines(models):
    incremental = SpecInferEngine.from_pretrained(models["llm"], max_batch_size=8)
    speculative = SpecInferEngine.from_pretrained(models["llm"], [models["close"], models["other"]],
                                                  tree=TreeConfig(expansion=(1, 2, 2, 1)), max_batch_size=8)
    return incremental, speculative


def plain_output(engine) -> list[list[int]]:
    return [r.token_ids for r in engine.generate(PROMPTS, SamplingParams(max_tokens=20, ignore_eos=True), speculate=False)]


def settings(plain: list[list[int]]) -> dict[str, list[SamplingParams]]:
    """Per request: its plain output's own tokens banned (one-token and two-token bad words), penalties."""
    return {
        "bad_words": [SamplingParams(max_tokens=20, ignore_eos=True, bad_sequences=[(out[3],), tuple(out[6:8])])
                      for out in plain],
        "repetition": [SamplingParams(max_tokens=20, ignore_eos=True, repetition_penalty=1.8)] * len(plain),
        "presence_frequency": [SamplingParams(max_tokens=20, ignore_eos=True, presence_penalty=0.7,
                                              frequency_penalty=0.9)] * len(plain),
    }


@pytest.mark.parametrize("kind", ["bad_words", "repetition", "presence_frequency"])
def test_speculative_equals_incremental_with_changed_targets(engines, kind):
    incremental, speculative = engines
    plain = plain_output(incremental)
    params = settings(plain)[kind]
    want = [r.token_ids for r in incremental.generate(PROMPTS, params, speculate=False)]
    got = speculative.generate(PROMPTS, params)
    assert [r.token_ids for r in got] == want
    assert sum(r.accepted_draft_tokens for r in got) > 0  # the trees were used, not only bonus tokens
    assert want != plain  # the setting changed the output
    if kind == "bad_words":
        for out, p in zip(want, params):
            assert p.bad_sequences[0][0] not in out
            pair = list(p.bad_sequences[1])
            assert all(out[i:i + 2] != pair for i in range(len(out) - 1))


def test_min_length_holds_back_the_end_token(engines):
    incremental, speculative = engines
    plain = plain_output(incremental)
    end = plain[0][2]  # a token the request would write third: as end_id it stops the plain request there
    stopped = incremental.generate(PROMPTS[:1], SamplingParams(max_tokens=20, end_id=end), speculate=False)[0]
    assert len(stopped.token_ids) == 3 and stopped.finish_reason == "stop"
    params = SamplingParams(max_tokens=20, end_id=end, min_length=10)
    want = incremental.generate(PROMPTS[:1], params, speculate=False)[0].token_ids
    assert speculative.generate(PROMPTS[:1], params)[0].token_ids == want
    assert end not in want[:10] and len(want) >= 10


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(0)
    logits = torch.randn(1, 40) * 3
    seq = Sequence(0, [3, 5, 5, 9], SamplingParams(repetition_penalty=1.3), frozenset(), make_generator(0))
    seq.output = [11, 3]
    want = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([[3, 5, 5, 9, 11, 3, 17]]), logits.clone())
    assert torch.allclose(process(logits, seq, [[17]]), want)


def test_penalties_and_bans_follow_each_nodes_own_path():
    logits = torch.zeros(3, 10)
    params = SamplingParams(presence_penalty=1.0, frequency_penalty=0.5, bad_sequences=[(4, 6)], min_length=2)
    seq = Sequence(0, [1, 2], params, frozenset({9}), make_generator(0))
    out = process(logits, seq, [[], [4], [4, 4]])
    assert out[0, 9] == float("-inf") and out[1, 9] == float("-inf") and out[2, 9] == 0  # min_length 2
    assert out[0, 6] == 0 and out[1, 6] == float("-inf") and out[2, 6] == float("-inf")  # after token 4 only
    assert out[0, 4] == 0 and out[1, 4] == -1.5 and out[2, 4] == -2.0  # presence 1 + frequency 0.5 x count
