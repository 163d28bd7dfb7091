"""Greedy speculative decoding equals incremental decoding token for token."""
from __future__ import annotations

import pytest
import torch

from conftest import prompts
from specinfer import SamplingParams, SpecInferEngine, TreeConfig

PROMPTS = prompts(24, seed=21)
# Requests end at different times, so batches change every iteration.
PARAMS = [SamplingParams(max_tokens=6 + (i * 7) % 19, ignore_eos=True) for i in range(len(PROMPTS))]
TREES = {"chain": (1,) * 8, "paper": (1, 1, 3, 1, 1, 1, 1, 1), "wide": (4, 2, 2, 1)}


@pytest.fixture(scope="module")
def reference(models):
    engine = SpecInferEngine.from_pretrained(models["llm"], max_batch_size=8)
    results = engine.generate(PROMPTS, PARAMS, speculate=False)
    for r, p in zip(results, PARAMS):
        assert r.llm_steps == len(r.token_ids) == p.max_tokens  # incremental: one token per LLM step
        assert r.draft_tokens == 0
    return [r.token_ids for r in results]


def test_incremental_batch_one_equals_batch_eight(models, reference):
    engine = SpecInferEngine.from_pretrained(models["llm"], max_batch_size=1)
    assert [r.token_ids for r in engine.generate(PROMPTS, PARAMS, speculate=False)] == reference


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("ssms", [("close",), ("close", "other")])
@pytest.mark.parametrize("tree", sorted(TREES))
def test_speculative_equals_incremental(models, reference, tree, ssms, batch):
    engine = SpecInferEngine.from_pretrained(
        models["llm"], [models[s] for s in ssms], tree=TreeConfig(expansion=TREES[tree]), max_batch_size=batch
    )
    results = engine.generate(PROMPTS, PARAMS)
    assert [r.token_ids for r in results] == reference
    accepted = sum(r.accepted_draft_tokens for r in results)
    steps = sum(r.llm_steps for r in results)
    # Every step emits its accepted tokens plus a bonus token; a request's last step may cut the bonus.
    assert steps + accepted - len(results) <= sum(len(r.token_ids) for r in results) <= steps + accepted
    assert 0 < accepted < sum(r.draft_tokens for r in results)  # the perturbed SSM is right only sometimes


@pytest.mark.parametrize("expansion", [(1, 1, 1, 1), (1, 1, 3, 1)])
def test_ssm_equal_to_llm_accepts_every_chain_token(models, expansion):
    engine = SpecInferEngine.from_pretrained(models["llm"], [models["llm"]], tree=TreeConfig(expansion=expansion))
    steps = 6
    results = engine.generate(PROMPTS[:8], SamplingParams(max_tokens=1 + 5 * steps, ignore_eos=True))
    for r in results:
        assert r.llm_steps == 1 + steps  # prefill, then depth + 1 = 5 tokens per verification
        assert r.accepted_draft_tokens == 4 * steps


def test_unrelated_ssm_is_still_exact(models, reference):
    engine = SpecInferEngine.from_pretrained(models["llm"], [models["other"]], tree=TreeConfig(expansion=(2, 2, 1)))
    results = engine.generate(PROMPTS, PARAMS)
    assert [r.token_ids for r in results] == reference
    assert sum(r.accepted_draft_tokens for r in results) < 0.2 * sum(r.draft_tokens for r in results)


def test_stop_tokens_truncate_accepted_paths_exactly(models, reference):
    engine = SpecInferEngine.from_pretrained(models["llm"], [models["llm"]], tree=TreeConfig(expansion=(1,) * 6))
    for i in range(6):
        full = reference[i]
        stop = full[len(full) // 2]
        expected = full[: full.index(stop) + 1]
        params = [SamplingParams(max_tokens=PARAMS[i].max_tokens, end_id=stop, ignore_eos=True),
                  SamplingParams(max_tokens=PARAMS[i].max_tokens, stop_token_ids=(stop,), ignore_eos=True)]
        for r in engine.generate([PROMPTS[i]] * 2, params):
            assert r.token_ids == expected and r.finish_reason == "stop"


def test_eos_from_the_checkpoint_stops_unless_ignored(models):
    engine = SpecInferEngine.from_pretrained(models["llm"], [models["close"]], tree=TreeConfig(expansion=(2, 1)))
    runs = engine.generate(PROMPTS, SamplingParams(max_tokens=60))
    stopped = [r for r in runs if r.finish_reason == "stop"]
    assert stopped, "no prompt reached EOS (id 2) in 60 tokens; pick other prompts"
    for r in stopped:
        assert r.token_ids[-1] == 2 and 2 not in r.token_ids[:-1]
    for r in runs:
        assert r.finish_reason == "stop" or len(r.token_ids) == 60


def test_string_prompts_use_the_llm_tokenizer(tmp_path, models):
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers, trainers

    tok = Tokenizer(tok_models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"]))
    folder = tmp_path / "llm_with_tokenizer"
    folder.mkdir()
    for f in models["llm"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    tok.save(str(folder / "tokenizer.json"))
    engine = SpecInferEngine.from_pretrained(folder, [models["close"]], tree=TreeConfig(expansion=(1, 1)))
    r = engine.generate(["the lazy fox"], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert r.text == tok.decode(r.token_ids, skip_special_tokens=True)
    ids = engine.generate([tok.encode("the lazy fox").ids], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert ids.token_ids == r.token_ids


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_speculative_equals_incremental(models):
    cpu = SpecInferEngine.from_pretrained(models["llm"], max_batch_size=8)
    expected = [r.token_ids for r in cpu.generate(PROMPTS, PARAMS, speculate=False)]
    engine = SpecInferEngine.from_pretrained(models["llm"], [models["close"], models["other"]], device="cuda",
                                             tree=TreeConfig(expansion=TREES["paper"]), max_batch_size=8)
    assert [r.token_ids for r in engine.generate(PROMPTS, PARAMS, speculate=False)] == expected
    assert [r.token_ids for r in engine.generate(PROMPTS, PARAMS)] == expected
