"""The model layer: a Llama-family transformer, what its tokens see (attention masks, the
batch-invariant attention), its KV cache, checkpoint readers (safetensors, GGUF) and CUDA graphs
around it. Nothing here knows about trees, requests or speculation."""
from .checkpoint import ModelArgs, read_checkpoint, read_model_args
from .kv_cache import KVCache, Rows
from .transformer import Linear, Transformer

__all__ = ["KVCache", "Linear", "ModelArgs", "Rows", "Transformer", "read_checkpoint", "read_model_args"]
