"""Exact streamed text: deltas never split a character that spans several tokens.

The decoding model sends a chunk of tokens only once it decodes to whole characters (holding back
a trailing partial UTF-8 sequence until it completes), together with the tokens before it as
context; the stateless postprocessing model then decodes the delta as
``decode(context + chunk)`` minus ``decode(context)``.
"""
from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"

Decode = Callable[[list[int]], str]


def sendable(decode: Decode, context: list[int], pending: list[int]) -> int:
    """How many of ``pending`` tokens can go now: all but a trailing partial character.

    Judged on the new text only (the context may itself end in invalid bytes). A UTF-8 character
    has at most 4 bytes, so at most 3 tokens are held back; new text that still ends in U+FFFD then
    is invalid bytes the model produced, and goes out as it is.
    """
    for held in range(min(3, len(pending)) + 1):
        n = len(pending) - held
        if not text_delta(decode, context, pending[:n]).endswith(REPLACEMENT):
            return n
    return len(pending)


def text_delta(decode: Decode, context: list[int], chunk: list[int]) -> str:
    full = decode(context + chunk)
    before = decode(context)
    return full[len(before):] if full.startswith(before) else decode(chunk)
