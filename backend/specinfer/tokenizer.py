"""The LLM folder's ``tokenizer.json`` (Hugging Face ``tokenizers``), where there is one."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


class TextTokenizer:
    def __init__(self, path: str | Path) -> None:
        self.tok = Tokenizer.from_file(str(path))

    @classmethod
    def from_folder(cls, folder: str | Path) -> "TextTokenizer | None":
        path = Path(folder) / "tokenizer.json"
        return cls(path) if path.is_file() else None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)
