"""Custom kernels: ``tree_attention``, the tree-attention kernel in OpenAI Triton (imported only when
selected: ``attention="triton"``), and ``path_attention``, the CPU's batch-invariant attention of
generated tokens (C++, compiled on first use)."""
