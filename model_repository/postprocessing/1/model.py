"""Triton entry point; the model lives in specinfer.serving.postprocessing_model."""
from specinfer.serving.postprocessing_model import TritonPythonModel  # noqa: F401
