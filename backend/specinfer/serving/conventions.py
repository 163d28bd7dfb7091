"""TensorRT-LLM's optional ensemble inputs that the first step settles (no Triton imports).

TensorRT-LLM's client scripts and genai-perf send these with every request; each is accepted where
its value asks for what this server does, and refused with an error naming it otherwise.
"""
from __future__ import annotations

import numpy as np

from .requests import scalar

NOT_IMPLEMENTED = {  # flag -> why a true value is refused
    "return_context_logits": "context logits are not returned by this server",
    "return_generation_logits": "generation logits are not returned by this server",
}


def flag(tensors: dict[str, np.ndarray | None], name: str) -> bool:
    value = tensors.get(name)
    return value is not None and bool(scalar(name, value))


def echo_prompt(tensors: dict[str, np.ndarray | None], vocab_size: int) -> bool:
    """Check TensorRT-LLM's optional inputs; returns whether ``text_output`` starts with the prompt.

    As TensorRT-LLM's backend does, a non-streamed response echoes the prompt unless
    ``exclude_input_in_output`` is true; streamed responses carry only the new text.
    """
    beam = tensors.get("beam_width")
    if beam is not None and int(scalar("beam_width", beam)) != 1:
        raise ValueError(f"beam_width {int(scalar('beam_width', beam))} is not supported: speculative decoding "
                         "keeps one sequence (send beam_width 1 or leave it out)")
    pad = tensors.get("pad_id")
    if pad is not None and not 0 <= int(scalar("pad_id", pad)) < vocab_size:
        raise ValueError(f"pad_id {int(scalar('pad_id', pad))} is outside the vocabulary [0, {vocab_size})")
    for name, why in NOT_IMPLEMENTED.items():
        if flag(tensors, name):
            raise ValueError(f"{name} is not supported: {why}")
    return not flag(tensors, "stream") and not flag(tensors, "exclude_input_in_output")
