"""Parity with Hugging Face ``LlamaForCausalLM`` and checkpoint loading errors."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import make_llama, prompts
from specinfer import SamplingParams, SpecInferEngine, TreeConfig
from specinfer.model import Transformer
from specinfer.runner import ModelRunner, chain_batch

VARIANTS = {
    "gqa_untied": {},
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "llama3_rope": dict(rope_theta=50000.0, max_position_embeddings=512, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    "linear_rope_bias": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, attention_bias=True, mlp_bias=True),
    "head_dim": dict(head_dim=32),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_hugging_face(tmp_path, variant):
    folder = make_llama(tmp_path / variant, seed=3, **VARIANTS[variant])
    hf = LlamaForCausalLM.from_pretrained(folder).eval()
    ours = Transformer.from_pretrained(folder)
    runner = ModelRunner(ours, rows=3, slots=160)
    seqs = prompts(3, seed=4, lo=5, hi=120)  # long enough to reach llama3's scaled band
    ours_logits = runner.forward([0, 1, 2], [0, 0, 0], chain_batch(seqs))
    for b, seq in enumerate(seqs):
        with torch.no_grad():
            ref = hf(torch.tensor([seq])).logits[0]
        torch.testing.assert_close(ours_logits[b, : len(seq)], ref, rtol=1e-4, atol=1e-4)


def test_sharded_checkpoint_loads_and_matches(tmp_path):
    folder = make_llama(tmp_path / "sharded", seed=5, shard="30KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 2
    hf = LlamaForCausalLM.from_pretrained(folder).eval()
    ours = Transformer.from_pretrained(folder)
    seq = prompts(1, seed=6, lo=9, hi=9)[0]
    logits = ModelRunner(ours, 1, 32).forward([0], [0], chain_batch([seq]))[0]
    with torch.no_grad():
        torch.testing.assert_close(logits, hf(torch.tensor([seq])).logits[0], rtol=1e-4, atol=1e-4)


def test_scattered_rows_equal_consecutive_rows(tmp_path):
    """Consecutive rows are read as cache views (a slice), others gathered: same logits either way."""
    model = Transformer.from_pretrained(make_llama(tmp_path / "m", seed=8))
    seqs = prompts(2, seed=9, lo=4, hi=20)
    views, gathered = ModelRunner(model, 4, 64), ModelRunner(model, 4, 64)
    assert isinstance(views.cache.rows_index([1, 2], torch.device("cpu")), slice)
    assert isinstance(gathered.cache.rows_index([3, 0], torch.device("cpu")), torch.Tensor)
    first = [views.forward([1, 2], [0, 0], chain_batch(seqs)), gathered.forward([3, 0], [0, 0], chain_batch(seqs))]
    torch.testing.assert_close(first[0], first[1])
    step = chain_batch([[5], [7]])  # decoding over the cached prompts
    lens = [len(s) for s in seqs]
    torch.testing.assert_close(views.forward([1, 2], lens, step), gathered.forward([3, 0], lens, step))
    torch.testing.assert_close(views.cache.k[0][1:3], gathered.cache.k[0][[3, 0]])


@pytest.mark.parametrize("speculate", [False, True])
def test_greedy_output_equals_hf_generate(models, speculate):
    hf = LlamaForCausalLM.from_pretrained(models["llm"]).eval()
    engine = SpecInferEngine.from_pretrained(models["llm"], [models["close"]], tree=TreeConfig(expansion=(1, 2, 1)))
    batch = prompts(4, seed=7)
    results = engine.generate(batch, SamplingParams(max_tokens=24, ignore_eos=True), speculate=speculate)
    for seq, res in zip(batch, results):
        with torch.no_grad():
            out = hf.generate(torch.tensor([seq]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        assert res.token_ids == out[0, len(seq):].tolist()


def test_bfloat16_weights_load_and_decode(models):
    engine = SpecInferEngine.from_pretrained(models["llm"], [models["close"]], dtype="bfloat16",
                                             tree=TreeConfig(expansion=(1, 1)))
    assert engine.llm.model.lm_head.weight.dtype == torch.bfloat16
    assert engine.llm.model.inv_freq.dtype == torch.float32
    res = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert len(res.token_ids) == 8


def test_missing_folder_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Transformer.from_pretrained(tmp_path / "nope")


def test_folder_without_config_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        Transformer.from_pretrained(tmp_path)


def edited_checkpoint(folder, source, weights: bool = False, **config):
    """A copy of ``source``'s config.json with ``config`` changed, and its weights if ``weights``."""
    folder.mkdir()
    cfg = json.loads((source / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **config}))
    if weights:
        (folder / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    return folder


def test_non_llama_model_type_is_a_value_error(tmp_path, models):
    folder = edited_checkpoint(tmp_path / "gpt2", models["llm"], model_type="gpt2")
    with pytest.raises(ValueError, match="model_type 'gpt2' is not a supported Llama-family model"):
        Transformer.from_pretrained(folder)


def test_missing_weights_is_a_value_error(tmp_path, models):
    folder = edited_checkpoint(tmp_path / "noweights", models["llm"])
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        Transformer.from_pretrained(folder)


def test_weights_of_another_shape_is_a_value_error(tmp_path, models):
    folder = edited_checkpoint(tmp_path / "mismatch", models["llm"], weights=True, num_hidden_layers=3)
    with pytest.raises(ValueError, match="missing .*model.layers.2"):
        Transformer.from_pretrained(folder)


def test_unsupported_rope_type_is_a_value_error(tmp_path, models):
    folder = edited_checkpoint(tmp_path / "yarn", models["llm"], weights=True,
                               rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        Transformer.from_pretrained(folder)
