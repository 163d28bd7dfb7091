"""Triton Python model: a chunk of token ids (and the tokens before it) -> its exact text delta,
after ``ECHO`` (the prompt, for a non-streamed request that did not exclude it; else empty).

The counters, log-probabilities and perf metrics of the decoding model pass through, so every
ensemble response carries them.
"""
from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from .detokenize import text_delta
from .preprocessing_model import TokenizerModel
from .repository import PASSED

PASS_THROUGH = {"TOKENS": "output_ids"} | {n.upper(): n for n, _, _ in PASSED}  # postprocessing input -> output


class TritonPythonModel(TokenizerModel):
    def respond(self, request):
        tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS").as_numpy().reshape(-1).tolist()
        context = pb_utils.get_input_tensor_by_name(request, "CONTEXT").as_numpy().reshape(-1).tolist()
        echo = pb_utils.get_input_tensor_by_name(request, "ECHO").as_numpy().reshape(-1)[0]
        text = echo.decode("utf-8") + (text_delta(self.tokenizer.decode, context, tokens) if tokens else "")
        # text_output is [1] (one string per batch row) as TensorRT-LLM's postprocessing sends it
        outputs = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))]
        for name, out in PASS_THROUGH.items():
            outputs.append(pb_utils.Tensor(out, pb_utils.get_input_tensor_by_name(request, name).as_numpy()))
        return pb_utils.InferenceResponse(output_tensors=outputs)
