"""SSMs run by ONNX Runtime give the same speculative decoding as PyTorch SSMs, token for token."""
from __future__ import annotations

import pytest

from conftest import prompts
from specinfer import SamplingParams, SpecInferEngine, TreeConfig

PROMPTS = prompts(10, seed=31)
PARAMS = [SamplingParams(max_tokens=5 + (i * 5) % 11, ignore_eos=True) for i in range(len(PROMPTS))]


@pytest.mark.parametrize("expansion", [(1, 1, 3, 1), (2, 2, 1)])
def test_onnxruntime_ssms_equal_torch_ssms_and_incremental(models, expansion):
    def run(ssm_engine: str, speculate: bool = True):
        engine = SpecInferEngine.from_pretrained(
            models["llm"], [models["close"], models["other"]], tree=TreeConfig(expansion=expansion), max_batch_size=4,
            ssm_engine=ssm_engine)
        return engine.generate(PROMPTS, PARAMS, speculate=speculate)

    torch_ssms, ort_ssms = run("torch"), run("onnxruntime")
    reference = [r.token_ids for r in run("torch", speculate=False)]
    assert [r.token_ids for r in ort_ssms] == [r.token_ids for r in torch_ssms] == reference
    # the same trees were drafted: the same drafts and acceptances, request by request
    assert [(r.draft_tokens, r.accepted_draft_tokens) for r in ort_ssms] == [
        (r.draft_tokens, r.accepted_draft_tokens) for r in torch_ssms]
    assert sum(r.accepted_draft_tokens for r in ort_ssms) > 0


def test_unknown_ssm_engine_is_refused(models):
    with pytest.raises(ValueError, match="ssm_engine must be one of"):
        SpecInferEngine.from_pretrained(models["llm"], [models["close"]], ssm_engine="tvm")
