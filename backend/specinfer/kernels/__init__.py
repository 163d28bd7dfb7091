"""Custom kernels: ``tree_attention``, the tree-attention kernel in OpenAI Triton (imported only when
selected: ``attention="triton"``); ``path_attention`` and ``rows_linear``, the CPU's batch-invariant
attention and linear layers of generated tokens (C++, one library compiled on first use: ``cpu_library``)."""
