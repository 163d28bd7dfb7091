"""GGUF checkpoints: tensors, metadata and tokenizer read by this engine equal what ``transformers``
reads from the same file; conversion to a folder; clear errors for foreign or broken files."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from gguf_files import CHAT_TEMPLATE, bpe_tokenizer, llama_cpp_permute, write_gguf
from specinfer import SamplingParams, SpecInferEngine
from specinfer.model.gguf import unpermute_rope
from specinfer.model import Transformer
from specinfer.runner import ModelRunner, chain_batch
from specinfer.tokenizer import TextTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "build_scripts"))
from convert_checkpoint import convert  # noqa: E402

PROMPT = "def add(a, b):\n    return a"


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


def tiny_llama(vocab: int, hidden: int = 64, intermediate: int = 128, tie: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=tie, initializer_range=0.1)
    state = LlamaForCausalLM(LlamaConfig(**cfg)).state_dict()
    if tie:
        state.pop("lm_head.weight")
    return state, cfg


def our_logits(path: Path, ids: list[int]) -> torch.Tensor:
    runner = ModelRunner(Transformer.from_pretrained(path), 1, len(ids) + 1)
    return runner.forward([0], [0], chain_batch([ids]))[0]


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module")
def q8_file(tmp_path_factory, tok) -> Path:
    state, cfg = tiny_llama(tok.get_vocab_size(), tie=True)
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-q8.gguf", state, cfg, tok, "Q8_0")


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.random.default_rng(0).standard_normal((4 * 16, 24)).astype(np.float32)
    for heads in (4, 2, 1):
        assert np.array_equal(unpermute_rope(llama_cpp_permute(w, heads), heads), w)
    assert not np.array_equal(llama_cpp_permute(w, 4), w)


@pytest.mark.parametrize("qtype,hidden", [("F32", 64), ("F16", 64), ("BF16", 64), ("Q8_0", 64), ("Q4_0", 64),
                                          ("Q4_1", 64), ("Q4_K", 256), ("Q6_K", 256)])
def test_logits_equal_transformers_reading_the_same_file(tmp_path, tok, qtype, hidden):
    state, cfg = tiny_llama(tok.get_vocab_size(), hidden=hidden, intermediate=2 * hidden, tie=qtype == "Q4_1")
    path = write_gguf(tmp_path / f"tiny-{qtype}.gguf", state, cfg, tok, qtype)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = tok.encode(PROMPT).ids
    ours, ref = our_logits(path, ids), hf_logits(hf, ids)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), float((ours - ref).abs().max())
    if qtype == "F32":  # unquantised: the file holds exactly the original model
        original = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
        original.load_state_dict(state, strict=False)
        original.tie_weights()
        assert torch.allclose(ours, hf_logits(original, ids), atol=1e-4, rtol=1e-4)


def test_tokenizer_from_metadata_encodes_like_transformers(tmp_path, q8_file):
    ours = TextTokenizer.from_checkpoint(q8_file)
    ref = AutoTokenizer.from_pretrained(q8_file.parent, gguf_file=q8_file.name)
    for text in [PROMPT, "The quick brown fox.", "  spaces\tand\nnewlines ", "unicode: é 日本", "<|im_start|>user"]:
        assert ours.encode(text) == ref(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == ref.decode(ref(text)["input_ids"], skip_special_tokens=True)
    messages = [{"role": "user", "content": "Hi there"}]
    assert ours.chat_template == CHAT_TEMPLATE
    assert ours.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.special["eos_token"] == "<|im_end|>"


def test_engine_serves_gguf_files_with_text_prompts(q8_file, tok):
    engine = SpecInferEngine.from_pretrained(q8_file, ssms=[q8_file], max_batch_size=2)
    assert engine.eos_ids == {2}
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    spec = engine.generate([PROMPT], params, speculate=True)[0]
    inc = engine.generate([PROMPT], params, speculate=False)[0]
    assert spec.token_ids == inc.token_ids and spec.text == inc.text
    assert spec.llm_steps < inc.llm_steps  # SSM == LLM: drafts are accepted
    assert spec.text == tok.decode(spec.token_ids)


def test_converted_folder_loads_in_transformers_and_here(tmp_path, q8_file):
    folder = tmp_path / "converted"
    convert(q8_file, folder, "float32")
    ids = bpe_tokenizer().encode(PROMPT).ids
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert torch.allclose(our_logits(folder, ids), our_logits(q8_file, ids), atol=0, rtol=0)
    assert torch.allclose(hf_logits(hf, ids), our_logits(folder, ids), atol=1e-4, rtol=1e-4)
    hf_tok = AutoTokenizer.from_pretrained(folder)
    assert (hf_tok.eos_token, hf_tok.bos_token) == ("<|im_end|>", "<|im_start|>")
    assert hf_tok(PROMPT)["input_ids"] == ids
    ours = TextTokenizer.from_checkpoint(folder)
    assert ours.apply_chat_template([{"role": "user", "content": "x"}]) == TextTokenizer.from_checkpoint(
        q8_file).apply_chat_template([{"role": "user", "content": "x"}])
    bf16 = tmp_path / "bf16"
    convert(q8_file, bf16, "bfloat16")
    assert Transformer.from_pretrained(bf16, dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def test_other_architecture_is_refused_by_name(tmp_path, tok):
    state, cfg = tiny_llama(tok.get_vocab_size())
    path = write_gguf(tmp_path / "other.gguf", state, cfg, tok, "F32", architecture="qwen2")
    with pytest.raises(ValueError, match="architecture 'qwen2' is not supported"):
        Transformer.from_pretrained(path)
    with pytest.raises(ValueError, match="architecture 'qwen2'"):
        SpecInferEngine.from_pretrained(path)


def test_truncated_or_missing_file_gives_a_clear_error(tmp_path, q8_file):
    data = q8_file.read_bytes()
    for cut in (16, len(data) // 2, len(data) - 100):
        broken = tmp_path / f"cut{cut}.gguf"
        broken.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=str(broken)):
            Transformer.from_pretrained(broken)
    with pytest.raises(ValueError, match="does not exist"):
        Transformer.from_pretrained(tmp_path / "missing.gguf")
