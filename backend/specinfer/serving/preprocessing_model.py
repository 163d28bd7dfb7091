"""Triton Python model: ``text_input`` (and ``stop_words``) -> token ids, with the LLM's tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from ..tokenizer import TextTokenizer
from .repository import repository_path
from .requests import decode_prompt, encode_stop_words


def load_tokenizer(args: dict) -> TextTokenizer:
    config = json.loads(args["model_config"])
    folder = repository_path(config["parameters"]["tokenizer_dir"]["string_value"], Path(args["model_repository"]))
    tokenizer = TextTokenizer.from_checkpoint(folder)
    if tokenizer is None:
        raise pb_utils.TritonModelException(f"no tokenizer.json in {folder}")
    return tokenizer


class TokenizerModel:
    """A stateless model answering each request on its own, with the LLM's tokenizer."""

    def initialize(self, args: dict) -> None:
        self.tokenizer = load_tokenizer(args)

    def execute(self, requests: list) -> list:
        return [self.respond(request) for request in requests]


class TritonPythonModel(TokenizerModel):
    def respond(self, request):
        try:
            text = decode_prompt(pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy())
            words = pb_utils.get_input_tensor_by_name(request, "stop_words")
            stop_ids = encode_stop_words(None if words is None else words.as_numpy(), self.tokenizer.encode)
            ids = np.array(self.tokenizer.encode(text), dtype=np.int32)
            if ids.size == 0:
                raise ValueError("text_input encodes to no tokens")
        except ValueError as exc:
            error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
            return pb_utils.InferenceResponse(output_tensors=[], error=error)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("input_ids", ids), pb_utils.Tensor("stop_ids", stop_ids)])
