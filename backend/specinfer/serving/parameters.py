"""A decoding model's ``config.pbtxt`` parameters: the one table the repository writer and the engine
reader share (no Triton imports).

Each parameter is one engine setting under the same name, read from its text. A parameter absent
from the file or empty leaves the library's default in force (``max_context``: the LLM's,
``attention`` and ``cuda_graphs``: the device's): the defaults are stated once, in ``EngineConfig`` /
``TreeConfig`` / ``SpecInferEngine.from_pretrained``. ``RepositoryOptions``
(repository.py) writes every parameter of this table it has a field of the same name for.

To add a parameter: one ``Parameter`` here, one field of that name in ``RepositoryOptions``.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..config import SuffixConfig, TreeConfig, parse_expansion, parse_proposers
from ..engine import SpecInferEngine


def boolean(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def names(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


@dataclass(frozen=True)
class Parameter:
    key: str
    read: Callable[[str], object]
    # where the value goes: "engine" (a SpecInferEngine.from_pretrained keyword), "tree" (a TreeConfig
    # field), "suffix" (the SuffixConfig field named by the key without "suffix_"), "model" (this table's own)
    into: str = "engine"


PARAMETERS = (
    Parameter("llm", str, "model"),  # a path, relative to the repository folder or absolute
    Parameter("ssms", names, "model"),  # comma-separated paths
    Parameter("head", str, "model"),  # the draft head's folder, a path as llm's (for proposers with "head")
    Parameter("speculate", boolean, "model"),  # false: no SSMs and no proposers (the incremental model)
    Parameter("device", str),
    Parameter("dtype", str),
    Parameter("max_batch_size", int),
    Parameter("max_context", int),
    Parameter("attention", str),
    Parameter("tensor_parallel_size", int),
    Parameter("ssm_engine", str),
    Parameter("cuda_graphs", boolean),
    Parameter("offload", str),
    Parameter("expansion", parse_expansion, "tree"),
    Parameter("max_tree_tokens", int, "tree"),
    Parameter("draft_sampling", str, "tree"),
    Parameter("verifier", str, "tree"),
    Parameter("adaptive", boolean, "tree"),
    Parameter("proposers", parse_proposers, "tree"),
    Parameter("max_speculative_batch", int, "tree"),
    Parameter("head_expansion", parse_expansion, "tree"),
    Parameter("suffix_global_tokens", int, "suffix"),
)
BY_KEY = {p.key: p for p in PARAMETERS}


def text(value: object) -> str:
    """A setting as its parameter text: sequences comma-joined, booleans lower-case, ``None`` empty."""
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


PBTXT_PARAMETER = re.compile(r'key\s*:\s*"((?:[^"\\]|\\.)*)"\s*value\s*:?\s*\{\s*string_value\s*:\s*"((?:[^"\\]|\\.)*)"\s*\}')


def read_pbtxt_parameters(pbtxt: str) -> dict[str, str]:
    """A model's ``parameters`` from the text of its ``config.pbtxt`` (``key``/``string_value`` pairs)."""
    unescape = lambda s: re.sub(r"\\(.)", r"\1", s)  # noqa: E731
    return {unescape(k): unescape(v) for k, v in PBTXT_PARAMETER.findall(pbtxt)}


def repository_path(value: str, model_dir: Path) -> Path:
    """A path from a model's parameters: absolute, or relative to the repository (the model folder's parent)."""
    path = Path(value)
    return path if path.is_absolute() else (model_dir.parent / path).resolve()


def engine_from_parameters(params: Mapping[str, str], model_dir: Path) -> SpecInferEngine:
    """The engine a decoding model's parameters describe (``model_dir``: its folder in the repository).
    Keys outside the table (request limits, other models' settings) are not the engine's and are skipped."""
    values: dict[str, object] = {}
    for key, raw in params.items():
        if key in BY_KEY and raw:
            try:
                values[key] = BY_KEY[key].read(raw)
            except ValueError as exc:
                raise ValueError(f"parameter {key}: {exc}") from None
    if "llm" not in values:
        raise ValueError(f"parameters of {model_dir} name no llm: not a decoding model's")
    if not values.get("speculate", True):
        values["ssms"], values["proposers"], values["head"] = (), (), None  # nothing to draft with: plain decoding
    given = lambda into: {p.key: values[p.key] for p in PARAMETERS if p.into == into and p.key in values}  # noqa: E731
    suffix = SuffixConfig(**{k.removeprefix("suffix_"): v for k, v in given("suffix").items()})
    return SpecInferEngine.from_pretrained(
        repository_path(values["llm"], model_dir), [repository_path(s, model_dir) for s in values.get("ssms", ())],
        tree=TreeConfig(**given("tree"), suffix=suffix), **given("engine"),
        head=repository_path(values["head"], model_dir) if values.get("head") else None)


def engine_from_config(config_pbtxt_path: str | Path, overrides: Mapping[str, object] | None = None) -> SpecInferEngine:
    """The engine the served decoding model builds from this ``config.pbtxt`` (e.g.
    ``model_repository/specinfer_llm/config.pbtxt``), with ``overrides`` (parameter name -> value,
    as text or as the setting itself, e.g. ``{"max_batch_size": 4, "cuda_graphs": False}``) replacing
    the file's. Relative paths are relative to the repository, as for the server."""
    path = Path(config_pbtxt_path)
    unknown = sorted(set(overrides or {}) - set(BY_KEY))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown}; the engine's are {sorted(BY_KEY)}")
    params = read_pbtxt_parameters(path.read_text()) | {k: text(v) for k, v in (overrides or {}).items()}
    return engine_from_parameters(params, path.resolve().parent)
