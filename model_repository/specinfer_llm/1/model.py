"""Triton entry point; the model lives in specinfer.serving.decoding_model."""
from specinfer.serving.decoding_model import TritonPythonModel  # noqa: F401
