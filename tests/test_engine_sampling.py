"""Sampled decoding through the whole engine follows the LLM's distribution; seeds reproduce."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import make_llama, prompts
from specinfer import SamplingParams, SpecInferEngine, TreeConfig
from specinfer.sampling import target_probs

V = 8
PROMPT = [3, 4, 5]
PARAMS = dict(temperature=0.9, top_k=6, top_p=0.95, max_tokens=3, ignore_eos=True)
SAMPLES = 4000


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    root = tmp_path_factory.mktemp("v8")
    llm = make_llama(root / "llm", seed=30, vocab=V, initializer_range=0.05)
    return llm, [make_llama(root / f"ssm{i}", seed=31 + i, noise_from=llm, noise=0.6) for i in range(2)]


def exact_second_and_third(llm_folder) -> dict[tuple[int, int], float]:
    """P(t2, t3) = sum over t1 of P(t1) P(t2 | t1) P(t3 | t1, t2), under the sampling settings."""
    hf = LlamaForCausalLM.from_pretrained(llm_folder).eval()
    sp = SamplingParams(**PARAMS)
    seqs = torch.tensor([PROMPT + [a, b] for a in range(V) for b in range(V)])
    with torch.no_grad():
        logits = hf(seqs).logits
    p1 = target_probs(logits[0, len(PROMPT) - 1], sp)
    p2 = target_probs(logits[::V, len(PROMPT)], sp)  # [t1, t2]
    p3 = target_probs(logits[:, len(PROMPT) + 1], sp).view(V, V, V)  # [t1, t2, t3]
    joint = (p1[:, None, None] * p2[:, :, None] * p3).sum(dim=0)
    return {(b, c): float(joint[b, c]) for b in range(V) for c in range(V)}


@pytest.mark.parametrize("draft_sampling, verifier", [
    ("with_replacement", "mss"), ("without_replacement", "mss"), ("with_replacement", "naive"),
    ("with_replacement", "gumbel")])
def test_engine_samples_follow_the_llm(small_vocab, draft_sampling, verifier):
    llm, ssms = small_vocab
    engine = SpecInferEngine.from_pretrained(
        llm, ssms, tree=TreeConfig(expansion=(2, 2), draft_sampling=draft_sampling, verifier=verifier),
        max_batch_size=500,
    )
    params = [SamplingParams(seed=i, **PARAMS) for i in range(SAMPLES)]
    results = engine.generate([PROMPT] * SAMPLES, params)
    assert sum(r.accepted_draft_tokens for r in results) > 0.2 * SAMPLES  # drafts do get accepted
    counts = Counter(tuple(r.token_ids[1:3]) for r in results)
    exact = exact_second_and_third(llm)
    tv = 0.5 * sum(abs(counts.get(k, 0) / SAMPLES - p) for k, p in exact.items())
    bound = 0.5 * sum(math.sqrt(p * (1 - p) / SAMPLES) for p in exact.values()) + math.sqrt(
        math.log(1e5) / (2 * SAMPLES))
    assert tv < bound, f"TV {tv:.4f} >= bound {bound:.4f}"


def test_same_seed_same_output_different_seeds_differ(models):
    engine = SpecInferEngine.from_pretrained(models["llm"], [models["close"], models["other"]],
                                             tree=TreeConfig(expansion=(2, 2, 1)), max_batch_size=4)
    batch = prompts(6, seed=40)
    sp = [SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=20, ignore_eos=True) for i in range(6)]
    first = [r.token_ids for r in engine.generate(batch, sp)]
    again = [r.token_ids for r in engine.generate(batch, sp)]
    assert first == again
    other = [r.token_ids for r in engine.generate(batch, [SamplingParams(temperature=1.0, top_p=0.9, seed=7 + i,
                                                                          max_tokens=20, ignore_eos=True)
                                                          for i in range(6)])]
    assert other != first


def test_mixed_greedy_and_sampled_requests_in_one_batch(models):
    engine = SpecInferEngine.from_pretrained(models["llm"], [models["close"]], tree=TreeConfig(expansion=(1, 2, 1)))
    batch = prompts(6, seed=41)
    greedy = SamplingParams(max_tokens=16, ignore_eos=True)
    expected = [r.token_ids for r in engine.generate(batch, greedy, speculate=False)]
    mixed = [greedy if i % 2 == 0 else SamplingParams(temperature=1.0, seed=i, max_tokens=16, ignore_eos=True)
             for i in range(6)]
    got = engine.generate(batch, mixed)
    assert [got[i].token_ids for i in range(0, 6, 2)] == expected[0::2]
    assert all(len(r.token_ids) == 16 for r in got)
