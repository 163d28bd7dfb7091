"""Triton request tensors -> engine inputs, with errors that name the field (no Triton imports)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..config import SamplingParams

OPTIONAL_SCALARS = {  # input name -> SamplingParams field
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "random_seed": "seed",
    "end_id": "end_id",
}


def scalar(name: str, value: np.ndarray):
    if value.size != 1:
        raise ValueError(f"{name} must hold exactly one value, got shape {list(value.shape)}")
    item = value.reshape(-1)[0]
    return item.item() if isinstance(item, np.generic) else item  # BYTES arrays hold bytes objects


def decode_prompt(raw: np.ndarray) -> str:
    """``text_input`` (BYTES [1]) as text: valid UTF-8, not empty."""
    value = scalar("text_input", raw)
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"text_input is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not value:
        raise ValueError("text_input is empty")
    return value


def encode_stop_words(words: np.ndarray | None, encode: Callable[[str], list[int]]) -> np.ndarray:
    """``stop_words`` (BYTES [-1]) as token sequences, flattened with -1 after each one."""
    flat: list[int] = []
    for word in [] if words is None else words.reshape(-1).tolist():
        try:
            text = word.decode("utf-8") if isinstance(word, bytes) else str(word)
        except UnicodeDecodeError:
            raise ValueError("stop_words holds a value that is not valid UTF-8") from None
        ids = encode(text) if text else []
        if not ids:
            raise ValueError("stop_words holds an empty string")
        flat += ids + [-1]
    return np.array(flat, dtype=np.int32)


def decode_stop_ids(flat: np.ndarray | None) -> tuple[tuple[int, ...], ...]:
    if flat is None:
        return ()
    seqs, cur = [], []
    for tok in flat.reshape(-1).tolist():
        if tok < 0:
            seqs.append(tuple(cur))
            cur = []
        else:
            cur.append(tok)
    return tuple(s for s in seqs if s)


def sampling_from_inputs(inputs: dict[str, np.ndarray | None]) -> tuple[SamplingParams, bool]:
    """SamplingParams and the ``stream`` flag from a request's tensors (missing optionals: defaults)."""
    if inputs.get("max_tokens") is None:
        raise ValueError("max_tokens is required")
    kwargs = {"max_tokens": int(scalar("max_tokens", inputs["max_tokens"]))}
    for name, field in OPTIONAL_SCALARS.items():
        if inputs.get(name) is not None:
            kwargs[field] = scalar(name, inputs[name])
    if "temperature" in kwargs:
        kwargs["temperature"] = float(kwargs["temperature"])
    if "top_p" in kwargs:
        kwargs["top_p"] = float(kwargs["top_p"])
    kwargs["stop_sequences"] = decode_stop_ids(inputs.get("stop_ids"))
    stream = bool(scalar("stream", inputs["stream"])) if inputs.get("stream") is not None else False
    return SamplingParams(**kwargs), stream
