"""Triton entry point; the model lives in specinfer.serving.bls_model."""
import os
import sys

sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # torch's large buffers on huge pages; read before torch loads
from specinfer.serving.bls_model import TritonPythonModel  # noqa: E402,F401
