"""Triton Python model: a chunk of token ids (and the tokens before it) -> its exact text delta.

The counters of the decoding model pass through, so every ensemble response carries them.
"""
from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from .detokenize import text_delta
from .preprocessing_model import TokenizerModel

PASS_THROUGH = {  # postprocessing input -> ensemble-facing output
    "TOKENS": "output_ids",
    "NUM_OUTPUT_TOKENS": "num_output_tokens",
    "NUM_LLM_STEPS": "num_llm_steps",
    "DRAFT_TOKENS": "total_draft_tokens",
    "ACCEPTED_DRAFT_TOKENS": "total_accepted_draft_tokens",
    "ACCEPTANCE_RATE": "acceptance_rate",
}


class TritonPythonModel(TokenizerModel):
    def respond(self, request):
        tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS").as_numpy().reshape(-1).tolist()
        context = pb_utils.get_input_tensor_by_name(request, "CONTEXT").as_numpy().reshape(-1).tolist()
        text = text_delta(self.tokenizer.decode, context, tokens) if tokens else ""
        outputs = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))]
        for name, out in PASS_THROUGH.items():
            outputs.append(pb_utils.Tensor(out, pb_utils.get_input_tensor_by_name(request, name).as_numpy()))
        return pb_utils.InferenceResponse(output_tensors=outputs)
