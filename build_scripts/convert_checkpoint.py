"""Convert a llama ``.gguf`` file into a standard Hugging Face checkpoint folder.

  python build_scripts/convert_checkpoint.py --gguf FILE --output DIR [--dtype float32|bfloat16|float16]

Writes ``config.json``, ``model.safetensors`` (dequantised weights, Hugging Face names and Q/K
layout), ``tokenizer.json`` and ``tokenizer_config.json`` (special tokens and chat template), which
both this engine and ``transformers`` load. The engine also serves the ``.gguf`` file directly;
a folder loads faster (no dequantisation, no tokenizer conversion at every start).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from specinfer.model.gguf import read_gguf
from specinfer.tokenizer import TextTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def convert(gguf: Path, output: Path, dtype: str = "float32") -> None:
    ckpt = read_gguf(gguf)
    tokenizer = TextTokenizer.from_checkpoint(gguf)
    output.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in ckpt.state.items()}
    save_file(state, str(output / "model.safetensors"), metadata={"format": "pt"})
    config = {**ckpt.config, "torch_dtype": dtype}
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(output)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, type=Path, help="a llama-architecture .gguf file")
    ap.add_argument("--output", required=True, type=Path, help="folder to write the checkpoint into")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = ap.parse_args()
    try:
        convert(args.gguf, args.output, args.dtype)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}")
    print(f"[convert] {args.gguf} -> {args.output} ({args.dtype})")


if __name__ == "__main__":
    main()
