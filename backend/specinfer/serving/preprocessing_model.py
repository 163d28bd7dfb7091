"""Triton Python model: ``text_input`` (and ``stop_words``, ``bad_words``) -> token ids, with the LLM's
tokenizer; with ``apply_chat_template`` true the text is first formatted by the tokenizer's chat template.
It also settles TensorRT-LLM's optional inputs (``conventions.py``) and passes on the prompt text that
a non-streamed ``text_output`` starts with (empty where none is echoed).

It is the first step every request reaches (ensemble or BLS), so it enforces the required inputs by
name and the repository's size limits before tokenising anything; ``max_tokens`` passes through it
so that the ensemble schedules nothing further for a request that lacks it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from ..tokenizer import TextTokenizer
from .conventions import echo_prompt
from .parameters import repository_path
from .repository import PRE_INPUTS, model_parameters
from .requests import Limits, chat_messages, decode_prompt, encode_words, require, scalar

REQUIRED = ("text_input", "max_tokens")


def load_tokenizer(args: dict) -> TextTokenizer:
    folder = repository_path(model_parameters(args)["tokenizer_dir"], Path(args["model_repository"]))
    tokenizer = TextTokenizer.from_checkpoint(folder)
    if tokenizer is None:
        raise pb_utils.TritonModelException(f"no tokenizer.json in {folder}")
    return tokenizer


class TokenizerModel:
    """A stateless model answering each request on its own, with the LLM's tokenizer."""

    def initialize(self, args: dict) -> None:
        self.tokenizer = load_tokenizer(args)
        self.limits = Limits.from_parameters(model_parameters(args))

    def execute(self, requests: list) -> list:
        return [self.respond(request) for request in requests]


class TritonPythonModel(TokenizerModel):
    def respond(self, request):
        try:
            tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in PRE_INPUTS}
            tensors = {name: None if t is None else t.as_numpy() for name, t in tensors.items()}
            require(tensors, REQUIRED)
            text = decode_prompt(tensors["text_input"], self.limits)
            echo = echo_prompt(tensors, self.tokenizer.tok.get_vocab_size())
            chat = tensors["apply_chat_template"]
            if chat is not None and bool(scalar("apply_chat_template", chat)):
                text = self.tokenizer.apply_chat_template(chat_messages(text))
            words = {name: encode_words(name, tensors[name], self.tokenizer.encode, self.limits)
                     for name in ("stop_words", "bad_words")}
            ids = np.array(self.tokenizer.encode(text), dtype=np.int32)
            if ids.size == 0:
                raise ValueError("text_input encodes to no tokens")
        except ValueError as exc:
            error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
            return pb_utils.InferenceResponse(output_tensors=[], error=error)
        echoed = (text if echo else "").encode("utf-8")
        return pb_utils.InferenceResponse(output_tensors=[  # [1, ...]: the batch dimension (repository.MAX_BATCH)
            pb_utils.Tensor("input_ids", ids[None]), pb_utils.Tensor("stop_ids", words["stop_words"][None]),
            pb_utils.Tensor("bad_ids", words["bad_words"][None]),
            pb_utils.Tensor("max_tokens", tensors["max_tokens"].reshape(1, 1)),
            pb_utils.Tensor("echo", np.array([[echoed]], dtype=np.object_))])
