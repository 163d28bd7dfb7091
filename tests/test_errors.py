"""Bad input raises ValueError naming the problem, and leaves the engine usable."""
from __future__ import annotations

import pytest

from conftest import make_llama
from specinfer import EngineConfig, SamplingParams, SpecInferEngine, TreeConfig


@pytest.fixture(scope="module")
def engine(models):
    return SpecInferEngine.from_pretrained(models["llm"], [models["close"]], tree=TreeConfig(expansion=(1, 2)),
                                           max_context=64)


@pytest.mark.parametrize("prompt, message", [
    ([], "prompt is empty"),
    ([5, 96], "prompt token id 96 is outside the vocabulary \\[0, 96\\)"),
    ([-1], "prompt token id -1 is outside the vocabulary"),
    ([3, 4.5], "prompt token id 4.5 is outside the vocabulary"),
    ("hello", "no tokenizer.json"),
])
def test_bad_prompts(engine, prompt, message):
    with pytest.raises(ValueError, match=message):
        engine.generate([[3, 4], prompt], SamplingParams(max_tokens=4))
    assert not engine.scheduler.has_work()  # nothing of the rejected call was queued
    assert len(engine.generate([[3, 4]], SamplingParams(max_tokens=4))[0].token_ids) == 4


def test_max_tokens_past_the_context(engine):
    with pytest.raises(ValueError, match="prompt \\(10 tokens\\) plus max_tokens \\(60\\) exceeds the context of 64"):
        engine.generate([list(range(3, 13))], SamplingParams(max_tokens=60))
    assert len(engine.generate([list(range(3, 13))], SamplingParams(max_tokens=54))[0].token_ids) <= 54


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(max_tokens=2.5), "max_tokens must be an integer >= 1"),
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be >= 0"),
    (dict(top_p=0.0), "top_p must be in \\(0, 1\\]"),
    (dict(top_p=1.5), "top_p must be in \\(0, 1\\]"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(seed=-3), "seed must be an integer in \\[0, 2\\*\\*64\\)"),
    (dict(seed=2**64), "seed must be an integer in"),
    (dict(top_p=float("nan")), "top_p must be in"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("temperature", [1e-38, 1e-40, 5e-324])
def test_tiny_temperature_decodes_greedily_among_other_requests(engine, temperature):
    """Logits / 1e-40 overflow to inf: such a request must neither raise nor disturb its batch."""
    prompts, greedy = [[3, 4, 5], [6, 7], [8]], SamplingParams(max_tokens=12)
    want = engine.generate(prompts, greedy)
    params = [greedy, SamplingParams(max_tokens=12, temperature=temperature, seed=1), SamplingParams(max_tokens=12)]
    got = engine.generate(prompts, params)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert not engine.scheduler.has_work()


def test_a_request_failing_inside_a_step_fails_alone(engine, monkeypatch):
    """Verification raising for one request fails that request only; its row is freed, the others
    finish with their own output, and the engine serves later calls."""
    prompts = [[3, 4, 5], [6, 7], [8, 9]]
    params = [SamplingParams(max_tokens=10, temperature=0.8, seed=s) for s in range(3)]
    want = engine.generate(prompts, params)
    import specinfer.engine as engine_module
    real = engine_module.mss_verify

    def flaky(tree, p, generator, **kw):
        if doomed[0] in (generator, "every request"):
            raise FloatingPointError("probabilities are not finite")
        return real(tree, p, generator, **kw)

    monkeypatch.setattr(engine_module, "mss_verify", flaky)
    seqs = [engine.new_sequence(p, sp) for p, sp in zip(prompts, params)]
    doomed = [seqs[1].generator]
    for seq in seqs:
        engine.add(seq)
    while engine.scheduler.has_work():
        engine.step()
    assert seqs[1].finish_reason == "error" and "FloatingPointError" in seqs[1].error
    assert [seqs[0].output, seqs[2].output] == [want[0].token_ids, want[2].token_ids]
    assert len(engine.scheduler.free_rows) == engine.config.max_batch_size
    doomed[0] = "every request"  # through generate(): a RuntimeError naming it, the engine still usable
    with pytest.raises(RuntimeError, match="1 of 1 requests failed, the first with FloatingPointError"):
        engine.generate([[3, 4]], SamplingParams(max_tokens=30, temperature=0.8, seed=0))
    assert not engine.scheduler.has_work()
    monkeypatch.undo()
    assert engine.generate([prompts[0]], params[0])[0].token_ids == want[0].token_ids


def test_mismatched_sampling_list(engine):
    with pytest.raises(ValueError, match="2 prompts but 1 sampling parameter sets"):
        engine.generate([[3], [4]], [SamplingParams()])


def test_ssm_with_another_vocabulary(tmp_path, models):
    ssm = make_llama(tmp_path / "ssm100", seed=9, vocab=100)
    with pytest.raises(ValueError, match="SSM 0 has a vocabulary of 100 tokens, the LLM 96"):
        SpecInferEngine.from_pretrained(models["llm"], [ssm])


def test_tree_too_large_for_the_ssms(models):
    with pytest.raises(ValueError, match="with 2 SSM\\(s\\), 0 suffix and 0 head nodes builds up to 89 tree tokens, more than max_tree_tokens=64"):
        SpecInferEngine.from_pretrained(models["llm"], [models["close"], models["other"]],
                                        tree=TreeConfig(expansion=(4, 2, 2, 1), max_tree_tokens=64))


def test_tree_too_large_for_the_batch_invariant_attention(models):
    with pytest.raises(ValueError, match="max_tree_tokens=129 is more than the batch-invariant attention verifies in one tree \\(128\\)"):
        SpecInferEngine.from_pretrained(models["llm"], [models["close"]], tree=TreeConfig(max_tree_tokens=129))
    SpecInferEngine.from_pretrained(models["llm"], [models["close"]], tree=TreeConfig(max_tree_tokens=129),
                                    batch_invariant=False)


def test_zero_width_expansion():
    with pytest.raises(ValueError, match="expansion width at step 2 must be an integer >= 1"):
        TreeConfig(expansion=(1, 1, 0))


def test_missing_and_non_llama_checkpoints(tmp_path, models):
    with pytest.raises(ValueError, match="does not exist"):
        SpecInferEngine.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="does not exist"):
        SpecInferEngine.from_pretrained(models["llm"], [tmp_path / "missing-ssm"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        SpecInferEngine.from_pretrained(tmp_path / "empty")


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_batch_size=0), "max_batch_size must be >= 1"),
    (dict(dtype="int8"), "dtype must be auto, float32, bfloat16 or float16"),
    (dict(device="tpu"), "device must be 'cpu' or 'cuda"),
    (dict(max_context=1), "max_context must be >= 2"),
])
def test_bad_engine_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)
