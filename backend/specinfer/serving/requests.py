"""Triton request tensors -> engine inputs, with errors that name the field (no Triton imports).

Sampling follows TensorRT-LLM's rule so that its clients get what they expect: an absent ``top_k``
is 0 and an absent ``top_p`` is 0, and with both 0 decoding is greedy whatever the temperature
(TensorRT-LLM's ``DefaultDecodingParams::getTopK/getTopP`` return 0, and ``regularizeTopKTopP`` in
``samplingTopKKernels.h`` turns top_k 0 + top_p 0 into top_k 1); a ``top_p`` of 0 with ``top_k`` > 0
means no top-p filter (top_p 1). So ``temperature`` alone never samples: give ``top_k`` or ``top_p``.
"""
from __future__ import annotations

import json
import math

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields

import numpy as np

from ..config import SamplingParams

OPTIONAL_SCALARS = {  # input name -> SamplingParams field
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "random_seed": "seed",
    "end_id": "end_id",
    "min_length": "min_length",
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "return_log_probs": "log_probs",
}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, checked before any tokenisation (repository parameters).

    Triton 2.51 accepts bodies of any size; these keep one client's input from costing the others
    seconds of tokenisation or per-token stop checks.
    """

    max_prompt_bytes: int = 256 * 1024
    max_stop_words: int = 64
    max_stop_word_bytes: int = 256

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "Limits":
        return cls(**{f.name: int(params[f.name]) for f in fields(cls) if params.get(f.name)})

    def parameters(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}


def require(tensors: dict[str, np.ndarray | None], names: Iterable[str]) -> None:
    """Triton 2.51 only counts a request's inputs, so a required one can be missing: check by name."""
    missing = [n for n in names if tensors.get(n) is None]
    if missing:
        raise ValueError(f"missing required input(s) {missing}")


def scalar(name: str, value: np.ndarray):
    if value.size != 1:
        raise ValueError(f"{name} must hold exactly one value, got shape {list(value.shape)}")
    item = value.reshape(-1)[0]
    return item.item() if isinstance(item, np.generic) else item  # BYTES arrays hold bytes objects


def decode_prompt(raw: np.ndarray, limits: Limits) -> str:
    """``text_input`` (BYTES [1]) as text: within ``max_prompt_bytes``, valid UTF-8, not empty."""
    value = scalar("text_input", raw)
    size = len(value) if isinstance(value, bytes) else len(str(value).encode())
    if size > limits.max_prompt_bytes:
        raise ValueError(f"text_input has {size} bytes, more than the limit max_prompt_bytes={limits.max_prompt_bytes}")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"text_input is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not value:
        raise ValueError("text_input is empty")
    return value


def encode_words(name: str, words: np.ndarray | None, encode: Callable[[str], list[int]], limits: Limits) -> np.ndarray:
    """``stop_words`` / ``bad_words`` (BYTES [-1]) as token sequences, flattened with -1 after each one.

    Empty strings are skipped: TensorRT-LLM's documented payloads send ``"stop_words": ""`` (and
    perf_analyzer's LLM guide ``[""]``) to mean none. The stop-word limits apply to both lists.
    """
    items = [] if words is None else words.reshape(-1).tolist()
    if len(items) > limits.max_stop_words:
        raise ValueError(f"{name} has {len(items)} words, more than the limit max_stop_words={limits.max_stop_words}")
    longest = max((len(w) if isinstance(w, bytes) else len(str(w).encode()) for w in items), default=0)
    if longest > limits.max_stop_word_bytes:
        raise ValueError(f"{name} holds a word of {longest} bytes, more than the limit "
                         f"max_stop_word_bytes={limits.max_stop_word_bytes}")
    flat: list[int] = []
    for word in items:
        try:
            text = word.decode("utf-8") if isinstance(word, bytes) else str(word)
        except UnicodeDecodeError:
            raise ValueError(f"{name} holds a value that is not valid UTF-8") from None
        ids = encode(text) if text else []
        if ids:
            flat += ids + [-1]
    return np.array(flat, dtype=np.int32)


def decode_word_ids(name: str, flat: np.ndarray | None, limits: Limits) -> tuple[tuple[int, ...], ...]:
    """``stop_ids`` / ``bad_ids`` (what ``encode_words`` made, or a direct client's) within the word limits."""
    if flat is None:
        return ()
    if flat.size > limits.max_stop_words * (limits.max_stop_word_bytes + 1):
        raise ValueError(f"{name} has {flat.size} values, more than max_stop_words={limits.max_stop_words} "
                         f"words of max_stop_word_bytes={limits.max_stop_word_bytes} tokens allow")
    seqs, cur = [], []
    for tok in flat.reshape(-1).tolist():
        if tok < 0:
            seqs.append(tuple(cur))
            cur = []
        else:
            cur.append(tok)
    return tuple(s for s in seqs if s)


def sampling_from_inputs(inputs: dict[str, np.ndarray | None], limits: Limits) -> tuple[SamplingParams, bool]:
    """SamplingParams and the ``stream`` flag from a request's tensors (missing optionals: defaults)."""
    require(inputs, ["max_tokens"])
    kwargs = {"max_tokens": int(scalar("max_tokens", inputs["max_tokens"]))}
    for name, field in OPTIONAL_SCALARS.items():
        if inputs.get(name) is not None:
            kwargs[field] = scalar(name, inputs[name])
    if "log_probs" in kwargs:
        kwargs["log_probs"] = bool(kwargs["log_probs"])
    for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        if name in kwargs:
            kwargs[name] = float(kwargs[name])
            if not math.isfinite(kwargs[name]):  # before the greedy rule below, which would hide an infinity
                raise ValueError(f"{name} must be a finite number, got {kwargs[name]!r}")
    top_p = kwargs.pop("top_p", 0.0)
    if kwargs.get("top_k", 0) == 0 and top_p == 0.0 and kwargs.get("temperature", 0.0) >= 0:  # (a bad one: 400)
        kwargs["temperature"] = 0.0  # TensorRT-LLM: neither top_k nor top_p set means greedy (module docstring)
    kwargs["top_p"] = top_p if top_p != 0.0 else 1.0
    kwargs["stop_sequences"] = decode_word_ids("stop_ids", inputs.get("stop_ids"), limits)
    kwargs["bad_sequences"] = decode_word_ids("bad_ids", inputs.get("bad_ids"), limits)
    stream = bool(scalar("stream", inputs["stream"])) if inputs.get("stream") is not None else False
    return SamplingParams(**kwargs), stream


def chat_messages(text: str) -> list[dict[str, str]]:
    """``text_input`` as chat messages for ``apply_chat_template``: a JSON list of ``{"role", "content"}``
    objects where it is one, else a single user message."""
    try:
        messages = json.loads(text)
    except json.JSONDecodeError:
        messages = None
    if isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    return [{"role": "user", "content": text}]
