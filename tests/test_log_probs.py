"""``log_probs``: each emitted token's log-probability under the LLM's target distribution, the same
from speculative and incremental decoding, and equal to the LLM's own (``transformers``)."""
from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from conftest import prompts
from specinfer import SamplingParams, SpecInferEngine, TreeConfig

PROMPTS = prompts(6, seed=9)


def test_greedy_log_probs_equal_the_llms(models):
    params = SamplingParams(max_tokens=12, ignore_eos=True, log_probs=True)
    incremental = SpecInferEngine.from_pretrained(models["llm"], max_batch_size=4).generate(PROMPTS, params, speculate=False)
    speculative = SpecInferEngine.from_pretrained(models["llm"], [models["close"]], tree=TreeConfig(expansion=(1, 2, 1)),
                                                  max_batch_size=4).generate(PROMPTS, params)
    hf = LlamaForCausalLM.from_pretrained(models["llm"]).eval()
    for prompt, inc, spec in zip(PROMPTS, incremental, speculative):
        assert spec.token_ids == inc.token_ids and len(inc.log_probs) == len(inc.token_ids) == 12
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + inc.token_ids])).logits[0].float()
        lp = torch.log_softmax(logits, dim=-1)
        want = [float(lp[len(prompt) - 1 + j, tok]) for j, tok in enumerate(inc.token_ids)]
        assert torch.allclose(torch.tensor(inc.log_probs), torch.tensor(want), atol=1e-4)
        assert torch.allclose(torch.tensor(spec.log_probs), torch.tensor(want), atol=1e-4)
    assert sum(r.accepted_draft_tokens for r in speculative) > 0


def test_log_probs_follow_the_changed_target(models):
    """With a repetition penalty the reported values are those of the penalised distribution."""
    plain = SamplingParams(max_tokens=10, ignore_eos=True, log_probs=True)
    penalised = SamplingParams(max_tokens=10, ignore_eos=True, log_probs=True, repetition_penalty=2.0)
    engine = SpecInferEngine.from_pretrained(models["llm"], [models["close"]], tree=TreeConfig(expansion=(1, 2, 1)))
    a, b = engine.generate(PROMPTS[:1], plain)[0], engine.generate(PROMPTS[:1], penalised)[0]
    c = engine.generate(PROMPTS[:1], penalised, speculate=False)[0]
    assert b.token_ids == c.token_ids and torch.allclose(torch.tensor(b.log_probs), torch.tensor(c.log_probs), atol=1e-5)
    assert a.log_probs != b.log_probs
    assert all(lp <= 0 for lp in b.log_probs)
