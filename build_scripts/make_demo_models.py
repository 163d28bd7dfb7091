"""Make the demo checkpoints in engines/demo/ reproducibly (fixed seeds, offline corpus).

Placeholder models: a byte-level BPE tokenizer trained on the Python standard library's sources,
a Llama LLM and two smaller Llama SSMs with random weights. They exercise every code path; they do
not predict each other, so speculation accepts little. Trained demo models replace them later.
"""
from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 1024
ARCH = {
    "llm": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4),
    "ssm-a": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1),
    "ssm-b": dict(hidden_size=96, intermediate_size=256, num_hidden_layers=1, num_attention_heads=3, num_key_value_heads=1),
}


def corpus(limit: int = 200) -> list[str]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.glob("*.py"))[:limit]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def make_tokenizer(out: Path) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.save(str(out / "tokenizer.json"))
    return tok


def make_model(out: Path, name: str, seed: int) -> None:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False, initializer_range=0.1, **ARCH[name])
    LlamaForCausalLM(cfg).eval().save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "engines" / "demo"))
    ap.add_argument("--force", action="store_true", help="rebuild even if the models exist")
    args = ap.parse_args()
    root = Path(args.output)
    if not args.force and all((root / n / "config.json").is_file() for n in ARCH):
        print(f"[models] demo models already in {root}")
        return
    for seed, name in enumerate(ARCH):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        make_model(folder, name, seed)
        make_tokenizer(folder)
        params = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(folder).parameters())
        print(f"[models] {name}: {params / 1e6:.2f}M parameters -> {folder}")


if __name__ == "__main__":
    main()
