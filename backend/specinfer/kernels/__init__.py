"""Custom kernels in OpenAI Triton (imported only when selected: ``attention="triton"``)."""
from .tree_attention import tree_attention

__all__ = ["tree_attention"]
