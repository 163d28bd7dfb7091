"""The LLM's tokenizer and chat template: a folder's ``tokenizer.json`` (+ ``tokenizer_config.json``)
or the metadata of a ``.gguf`` file, converted by ``transformers``."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from .model.gguf import is_gguf, read_gguf_config

SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


class TextTokenizer:
    def __init__(self, tok: Tokenizer, chat_template: str | None = None, special: dict[str, str] | None = None) -> None:
        self.tok = tok
        self.chat_template = chat_template
        self.special = dict(special or {})

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "TextTokenizer | None":
        """The tokenizer of a checkpoint folder or ``.gguf`` file; None where the folder has none."""
        if is_gguf(path):
            return cls.from_gguf(path)
        folder = Path(path)
        if not (folder / "tokenizer.json").is_file():
            return None
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        template = config.get("chat_template")
        if template is None and (folder / "chat_template.jinja").is_file():  # transformers v5 writes it apart
            template = (folder / "chat_template.jinja").read_text()
        special = {}
        for key in SPECIAL_TOKENS:
            value = config.get(key)
            if isinstance(value, dict):  # older configs store AddedToken dictionaries
                value = value.get("content")
            if value:
                special[key] = value
        return cls(Tokenizer.from_file(str(folder / "tokenizer.json")), template, special)

    @classmethod
    def from_gguf(cls, path: str | Path) -> "TextTokenizer":
        """A ``.gguf`` file's tokenizer, special tokens and chat template, as ``transformers``' GGUF
        tokenizer converters make them."""
        from transformers import AutoTokenizer

        path = Path(path)
        read_gguf_config(path)  # the architecture check, before transformers' own messages
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        special = {k: getattr(tok, k) for k in SPECIAL_TOKENS if getattr(tok, k, None)}
        return cls(tok.backend_tokenizer, getattr(tok, "chat_template", None), special)

    def save(self, folder: str | Path) -> None:
        """``tokenizer.json`` and a ``tokenizer_config.json`` (special tokens, chat template) that
        ``transformers.AutoTokenizer`` loads with its EOS, BOS and pad tokens set."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(folder / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` (``{"role", "content"}`` dicts), rendered as ``transformers`` does."""
        if not self.chat_template:
            raise ValueError("the LLM's tokenizer has no chat template")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special)
        except TemplateError as exc:
            raise ValueError(f"chat template: {exc}") from exc
