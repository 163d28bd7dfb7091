"""Serving helpers without a server: request parsing, stop words, streamed detokenization, repository."""
from __future__ import annotations

import json

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers

from specinfer.serving.conventions import echo_prompt
from specinfer.serving.detokenize import sendable, text_delta
from specinfer.serving.errors import step_error_code
from specinfer.serving.parameters import repository_path
from specinfer.serving.repository import RepositoryOptions, repository_files
from specinfer.serving.requests import (Limits, chat_messages, decode_prompt, decode_word_ids, encode_words, require,
                                        sampling_from_inputs)

ROOT = Path(__file__).resolve().parents[1]
LIMITS = Limits()


@pytest.fixture(scope="module")
def byte_tokenizer():
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world, plain ascii text"] * 10, trainers.BpeTrainer(
        vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


def test_streamed_deltas_are_exact_across_multibyte_characters(byte_tokenizer):
    decode = byte_tokenizer.decode
    text = "héllo 日本語 🙂 world ü"
    ids = byte_tokenizer.encode(text).ids
    assert len(ids) > len(text)  # characters span several byte tokens
    for step in (1, 2, 3):
        context, sent, deltas = [], 0, []
        for end in range(step, len(ids) + step, step):
            pending = ids[sent:min(end, len(ids))]
            n = len(pending) if end >= len(ids) else sendable(decode, context, pending)
            if n:
                deltas.append(text_delta(decode, context, pending[:n]))
                context, sent = pending[:n], sent + n
        assert "".join(deltas) == text
        assert all("\ufffd" not in d for d in deltas)


def test_a_character_after_invalid_bytes_streams_whole(byte_tokenizer):
    """Regression: a stream whose last chunk ended in an invalid byte sent the next character's
    lead byte alone, and the following delta decoded without it."""
    decode = byte_tokenizer.decode
    char = byte_tokenizer.encode("日").ids
    assert len(char) == 3
    ids = [char[1]] * 4 + char + byte_tokenizer.encode(" ok").ids  # invalid bytes, sent as they are
    context, deltas, sent = [], [], 0
    for end in range(1, len(ids) + 1):
        pending = ids[sent:end]
        n = len(pending) if end == len(ids) else sendable(decode, context, pending)
        if n:
            deltas.append(text_delta(decode, context, pending[:n]))
            context, sent = pending[:n], sent + n
    assert "".join(deltas) == decode(ids)
    assert "日" in "".join(deltas)


def test_invalid_bytes_are_not_held_back_forever(byte_tokenizer):
    bad = byte_tokenizer.encode("\u00e9").ids[:1] * 5  # five lone lead bytes: never a character
    assert sendable(byte_tokenizer.decode, [], bad) == len(bad)


def test_sampling_from_inputs_defaults_and_values():
    params, stream = sampling_from_inputs({"max_tokens": np.array([7], np.int32)}, LIMITS)
    assert (params.max_tokens, params.temperature, params.top_k, params.top_p, params.seed, stream) == (7, 0.0, 0, 1.0, None, False)
    params, stream = sampling_from_inputs({
        "max_tokens": np.array([5], np.int32), "temperature": np.array([0.7], np.float32),
        "top_k": np.array([4], np.int32), "top_p": np.array([0.9], np.float32), "random_seed": np.array([9], np.uint64),
        "end_id": np.array([2], np.int32), "stream": np.array([True]), "stop_ids": np.array([4, 5, -1, 6, -1], np.int32)}, LIMITS)
    assert params.top_k == 4 and params.seed == 9 and params.end_id == 2 and stream
    assert abs(params.temperature - 0.7) < 1e-6 and abs(params.top_p - 0.9) < 1e-6
    assert params.stop_sequences == ((4, 5), (6,))


@pytest.mark.parametrize("given, greedy, top_p", [
    ({"temperature": 1.0}, True, 1.0),  # TensorRT-LLM: neither top_k nor top_p means greedy
    ({"temperature": 0.8, "top_k": 0, "top_p": 0.0}, True, 1.0),
    ({"temperature": 0.8, "top_k": 5}, False, 1.0),  # top_k alone: no top-p filter
    ({"temperature": 0.8, "top_k": 5, "top_p": 0.0}, False, 1.0),
    ({"temperature": 0.8, "top_p": 0.9}, False, 0.9),
])
def test_tensorrt_llm_greedy_rule(given, greedy, top_p):
    dtypes = {"temperature": np.float32, "top_k": np.int32, "top_p": np.float32}
    inputs = {"max_tokens": np.array([[3]], np.int32)} | {k: np.array([[v]], dtypes[k]) for k, v in given.items()}
    params, _ = sampling_from_inputs(inputs, LIMITS)
    assert params.greedy == greedy and abs(params.top_p - top_p) < 1e-6


def test_tensorrt_llm_conventions():
    def t(value, dtype=np.int32):
        return np.array([[value]], dtype)

    assert echo_prompt({}, 100)
    assert not echo_prompt({"stream": t(True, bool)}, 100)
    assert not echo_prompt({"exclude_input_in_output": t(True, bool)}, 100)
    assert echo_prompt({"beam_width": t(1), "pad_id": t(99),
                        "return_context_logits": t(False, bool)}, 100)
    for inputs, message in [({"beam_width": t(2)}, "beam_width 2 is not supported"),
                            ({"pad_id": t(100)}, "pad_id 100 is outside the vocabulary"),
                            ({"return_context_logits": t(True, bool)}, "return_context_logits is not supported"),
                            ({"return_generation_logits": t(True, bool)}, "return_generation_logits is not supported")]:
        with pytest.raises(ValueError, match=message):
            echo_prompt(inputs, 100)


@pytest.mark.parametrize("inputs, message", [
    ({}, "missing required input\\(s\\) \\['max_tokens'\\]"),
    ({"max_tokens": np.array([3], np.int32), "stop_ids": np.zeros(64 * 257 + 1, np.int32)}, "stop_ids has 16449 values"),
    ({"max_tokens": np.array([1, 2], np.int32)}, "max_tokens must hold exactly one value"),
    ({"max_tokens": np.array([3], np.int32), "top_p": np.array([1.5], np.float32)}, "top_p must be in"),
    ({"max_tokens": np.array([3], np.int32), "repetition_penalty": np.array([0.0], np.float32)}, "repetition_penalty"),
    ({"max_tokens": np.array([3], np.int32), "min_length": np.array([-1], np.int32)}, "min_length must be"),
    # non-finite: refused whatever the other fields (the greedy rule would otherwise hide +inf)
    ({"max_tokens": np.array([3], np.int32), "temperature": np.array([np.inf], np.float32)},
     "temperature must be a finite number, got inf"),
    ({"max_tokens": np.array([3], np.int32), "temperature": np.array([np.nan], np.float32)}, "temperature must be a finite"),
    ({"max_tokens": np.array([3], np.int32), "temperature": np.array([-np.inf], np.float32),
      "top_k": np.array([5], np.int32)}, "temperature must be a finite number, got -inf"),
    ({"max_tokens": np.array([3], np.int32), "top_p": np.array([np.nan], np.float32)}, "top_p must be a finite"),
    ({"max_tokens": np.array([3], np.int32), "presence_penalty": np.array([np.inf], np.float32)},
     "presence_penalty must be a finite"),
])
def test_sampling_from_inputs_errors(inputs, message):
    with pytest.raises(ValueError, match=message):
        sampling_from_inputs(inputs, LIMITS)


def test_prompt_and_stop_word_errors():
    assert decode_prompt(np.array(["é".encode()], dtype=np.object_), LIMITS) == "é"
    with pytest.raises(ValueError, match="not valid UTF-8"):
        decode_prompt(np.array([b"\xff"], dtype=np.object_), LIMITS)
    with pytest.raises(ValueError, match="text_input is empty"):
        decode_prompt(np.array([b""], dtype=np.object_), LIMITS)
    flat = encode_words("stop_words", np.array([b"ab", b"", b"c"], dtype=np.object_), lambda s: [ord(ch) for ch in s],
                        LIMITS)
    assert flat.tolist() == [97, 98, -1, 99, -1] and decode_word_ids("stop_ids", flat, LIMITS) == ((97, 98), (99,))
    assert encode_words("bad_words", np.array([b""], dtype=np.object_), lambda s: [1], LIMITS).size == 0  # none


def test_limits_are_checked_before_any_tokenisation():
    small = Limits(max_prompt_bytes=4, max_stop_words=2, max_stop_word_bytes=3)
    assert Limits.from_parameters(small.parameters()) == small
    assert Limits.from_parameters({"max_stop_words": "9", "tokenizer_dir": "x"}) == Limits(max_stop_words=9)
    assert decode_prompt(np.array([b"abcd"], dtype=np.object_), small) == "abcd"
    with pytest.raises(ValueError, match="text_input has 5 bytes, more than the limit max_prompt_bytes=4"):
        decode_prompt(np.array([b"abcde"], dtype=np.object_), small)

    def never(_: str) -> list[int]:
        raise AssertionError("tokenised a request past its limits")

    with pytest.raises(ValueError, match="stop_words has 3 words, more than the limit max_stop_words=2"):
        encode_words("stop_words", np.array([b"a", b"b", b"c"], dtype=np.object_), never, small)
    with pytest.raises(ValueError, match="a word of 4 bytes, more than the limit max_stop_word_bytes=3"):
        encode_words("stop_words", np.array([b"a", "éé".encode()], dtype=np.object_), never, small)


def test_required_inputs_are_checked_by_name():
    require({"text_input": np.array([b"x"]), "max_tokens": np.array([1])}, ["text_input", "max_tokens"])
    with pytest.raises(ValueError, match="missing required input\\(s\\) \\['max_tokens'\\]"):
        require({"text_input": np.array([b"x"]), "temperature": np.array([0.5])}, ["text_input", "max_tokens"])


def test_checked_in_repository_is_what_the_generator_writes():
    for rel, content in repository_files(RepositoryOptions()).items():
        assert (ROOT / "model_repository" / rel).read_text() == content, rel
    on_disk = {str(p.relative_to(ROOT / "model_repository")) for p in (ROOT / "model_repository").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert on_disk == set(repository_files(RepositoryOptions()))


def test_repository_paths_are_relative_to_the_repository(tmp_path):
    model_dir = tmp_path / "repo" / "specinfer_llm"
    assert repository_path("../engines/demo/llm", model_dir) == (tmp_path / "engines" / "demo" / "llm").resolve()
    assert repository_path("/abs/llm", model_dir) == Path("/abs/llm")


def test_chat_messages_from_text_input():
    assert chat_messages("hello") == [{"role": "user", "content": "hello"}]
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u", "extra": 1}]
    assert chat_messages(json.dumps(msgs)) == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    for text in ("[1, 2, 3] sorted?", "[]", '[{"role": "user"}]', "{not json"):  # not a message list: one message
        assert chat_messages(text) == [{"role": "user", "content": text}]


@pytest.mark.parametrize("message, code", [
    ("text_input is empty", "INVALID_ARG"),
    ("max_tokens must be an integer >= 1, got 0", "INVALID_ARG"),
    ("internal error in the decoding engine for this request; see the server log", "INTERNAL"),
    ("internal error in the decoding engine: tensor-parallel worker 1 died", "INTERNAL"),
    ("Failed to process the request(s) for model 'preprocessing_0_1', message: TypeError: x", "INTERNAL"),
    ("the server is shutting down", "UNAVAILABLE"),
    ("the model is being unloaded", "UNAVAILABLE"),
])
def test_a_step_error_gets_its_code_back(message, code):
    """What specinfer_bls / specinfer_unary answer for a step's error, which Triton hands them as INTERNAL."""
    assert step_error_code(message) == code
