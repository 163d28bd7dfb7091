"""Triton entry point; the model lives in specinfer.serving.preprocessing_model."""
from specinfer.serving.preprocessing_model import TritonPythonModel  # noqa: F401
