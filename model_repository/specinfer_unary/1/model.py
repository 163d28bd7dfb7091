"""Triton entry point; the model lives in specinfer.serving.bls_model."""
from specinfer.serving.bls_model import TritonPythonModel  # noqa: F401
