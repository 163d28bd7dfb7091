"""The errors a step sends that are not the client's fault, and the code each step error deserves
(no Triton imports).

Triton 2.51 hands a BLS model a step's error with code INTERNAL whatever code the step gave it, so
``specinfer_bls`` and ``specinfer_unary`` would answer every bad input with gRPC INTERNAL / HTTP 500.
They restore the code from the message: the steps answer a client's mistake with INVALID_ARG, and
everything else they send starts with one of the texts below.
"""
from __future__ import annotations

ENGINE_FAILED = "internal error in the decoding engine"  # every failure of the engine starts so
SHUTTING_DOWN = "the server is shutting down"  # the launcher's drain (launcher.Server.drain)
DRAIN_ID_ENV = "SPECINFER_DRAIN_ID"  # the request id of that drain, known only to the launcher and its server
UNLOADING = "the model is being unloaded"
MODEL_RAISED = "Failed to process the request"  # the Python backend's words for an exception out of execute


def step_error_code(message: str) -> str:
    """The ``TritonError`` code name a step's error should carry: INVALID_ARG, UNAVAILABLE or INTERNAL."""
    if message.startswith((SHUTTING_DOWN, UNLOADING)):
        return "UNAVAILABLE"
    if message.startswith((ENGINE_FAILED, MODEL_RAISED)):
        return "INTERNAL"
    return "INVALID_ARG"
