"""Tiny llama GGUF files written by the tests with the ``gguf`` package's writer, as llama.cpp's
converter lays them out (Q/K rows permuted for its rope, names ``blk.N.*``, a gpt2-style BPE
tokenizer and a chat template in the metadata)."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = ("def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog. "
        "Speculative decoding proposes tokens with a small model; the large model verifies them. ") * 20
NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
         "lm_head.weight": "output.weight"}
LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
K_BLOCK = {gguf.GGMLQuantizationType.Q4_K: 144, gguf.GGMLQuantizationType.Q6_K: 210}


def bpe_tokenizer(vocab: int = 320) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return tok


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's rows from rotate-half order to interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf in NAMES:
        return NAMES[hf]
    _, _, layer, *rest = hf.split(".")
    return f"blk.{layer}.{LAYER['.'.join(rest[:-1])]}.{rest[-1]}"


def k_quant_blocks(shape: tuple[int, int], qtype, rng: np.random.Generator) -> np.ndarray:
    """Random but finite K-quant blocks (``gguf`` dequantises K-quants but cannot quantise to them)."""
    n_blocks = shape[0] * shape[1] // 256
    blocks = rng.integers(0, 256, size=(n_blocks, K_BLOCK[qtype]), dtype=np.uint8)
    scale = np.full((n_blocks, 1), 0.003, np.float16).view(np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q4_K:  # d, dmin, then scales and quants
        blocks[:, 0:2], blocks[:, 2:4] = scale, scale
    else:  # Q6_K: quants and scales, then d last
        blocks[:, -2:] = scale
    return blocks.reshape(shape[0], -1)


def write_gguf(path: Path, state: dict[str, torch.Tensor], cfg: dict, tok: Tokenizer, qtype: str = "F32",
               architecture: str = "llama", seed: int = 0) -> Path:
    """Write ``state`` (Hugging Face names) as a GGUF file; 2-D weights in ``qtype``, norms in F32."""
    rng = np.random.default_rng(seed)
    qt = gguf.GGMLQuantizationType[qtype]
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name("tiny test llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(int(qt) if qtype != "F32" else 0)
    spec = json.loads(tok.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in SPECIALS else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in state.items():
        data = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            data = llama_cpp_permute(data, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            data = llama_cpp_permute(data, cfg["num_key_value_heads"])
        if data.ndim == 1 or qtype == "F32":
            w.add_tensor(gguf_name(name), np.ascontiguousarray(data, dtype=np.float32))
        elif qt in K_BLOCK:
            w.add_tensor(gguf_name(name), k_quant_blocks(data.shape, qt, rng), raw_dtype=qt)
        elif qtype == "F16":
            w.add_tensor(gguf_name(name), data.astype(np.float16))
        else:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(data, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
