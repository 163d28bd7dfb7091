"""``specinfer.engine_from_config``: the served engine, reproduced in Python from a repository."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from unittest import mock

import shutil

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from conftest import VOCAB

from specinfer import EngineConfig, SpecInferEngine, TreeConfig, engine_from_config
from specinfer.config import SuffixConfig
from specinfer.serving.parameters import PARAMETERS, PBTXT_PARAMETER, read_pbtxt_parameters
from specinfer.serving.repository import RepositoryOptions, model_parameters, write_repository
from specinfer.tokenizer import TextTokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def repo(models, tmp_path_factory) -> Path:
    """A repository whose paths are relative to it, as the checked-in one's are; its LLM has a
    tokenizer (text serving needs one)."""
    base = tmp_path_factory.mktemp("from_config")
    llm = shutil.copytree(models["llm"], base / "llm")
    words = Tokenizer(WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    words.pre_tokenizer = Whitespace()
    TextTokenizer(words).save(llm)
    root = base / "repo"
    relative = lambda p: os.path.relpath(p, root)  # noqa: E731
    opts = RepositoryOptions(llm=relative(llm), ssms=(relative(models["close"]), relative(models["other"])),
                             expansion=(1, 2), max_context=64, dtype="float32", max_batch_size=3, adaptive=False,
                             suffix_global_tokens=100, proposers=("suffix", "ssm"), head=None)  # no head for the test LLM
    return write_repository(root, opts)


def triton_args(model_dir: Path) -> dict:
    """What Triton hands a Python model's ``initialize``: its config parsed by protobuf, as JSON (field names
    kept, empty values printed: Triton's options)."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    text = json_format.MessageToJson(config, preserving_proto_field_name=True, including_default_value_fields=True)
    return {"model_config": text, "model_repository": str(model_dir), "model_name": model_dir.name}


def served_engine(model_dir: Path) -> SpecInferEngine:
    """The engine the served decoding model builds, through its own ``initialize`` (Triton's module faked)."""
    with mock.patch.dict(sys.modules, {"triton_python_backend_utils": mock.MagicMock()}):
        sys.modules.pop("specinfer.serving.decoding_model", None)
        model = importlib.import_module("specinfer.serving.decoding_model").TritonPythonModel()
        model.initialize(triton_args(model_dir))
        sys.modules.pop("specinfer.serving.decoding_model", None)
    model.loop.close()
    return model.engine


@pytest.mark.parametrize("model", ["specinfer_llm", "incremental_llm"])
def test_the_engine_is_the_one_the_served_model_builds(repo, models, model):
    config = repo / model / "config.pbtxt"
    assert read_pbtxt_parameters(config.read_text()) == model_parameters(triton_args(repo / model))
    engine, served = engine_from_config(config), served_engine(repo / model)
    assert engine.config == served.config
    assert [r.model.args for r in engine.ssms] == [r.model.args for r in served.ssms]
    speculate = model == "specinfer_llm"
    tree = TreeConfig(expansion=(1, 2), verifier="gumbel", proposers=("suffix", "ssm") if speculate else (),
                      suffix=SuffixConfig(global_tokens=100), max_speculative_batch=RepositoryOptions.max_speculative_batch)
    assert engine.config == EngineConfig(max_batch_size=3, max_context=64, dtype="float32", tree=tree)
    assert len(engine.ssms) == (2 if speculate else 0) and (engine.suffix is not None) == speculate
    assert engine.kv_cache_tokens == 3 * engine.llm.cache.slots


def test_overrides_replace_the_file_s_parameters(repo, models):
    config = repo / "specinfer_llm" / "config.pbtxt"
    engine = engine_from_config(config, {"max_batch_size": 2, "expansion": (1,), "proposers": "ssm",
                                         "ssms": [str(models["close"])], "cuda_graphs": False})
    assert (engine.config.max_batch_size, engine.tree.expansion, engine.tree.proposers) == (2, (1,), ("ssm",))
    assert engine.config.cuda_graphs is False and len(engine.ssms) == 1
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):  # the parameter reaches the engine
        engine_from_config(config, {"cuda_graphs": True})
    with pytest.raises(ValueError, match="unknown parameter\\(s\\) \\['max_batch'\\]"):
        engine_from_config(config, {"max_batch": 2})
    with pytest.raises(ValueError, match="parameter adaptive: expected true or false, got 'yes'"):
        engine_from_config(config, {"adaptive": "yes"})


def test_absent_or_empty_parameters_are_the_library_s_defaults(models, tmp_path):
    model_dir = tmp_path / "decoder"
    model_dir.mkdir()
    (model_dir / "config.pbtxt").write_text(
        f'name: "decoder"\nbackend: "python"\nparameters {{ key: "llm" value: {{ string_value: "{models["llm"]}" }} }}\n'
        'parameters: { key: "max_context"\n  value: { string_value: "" } }\n')  # another spacing, a colon
    engine = engine_from_config(model_dir / "config.pbtxt")
    assert engine.config == SpecInferEngine.from_pretrained(models["llm"]).config == EngineConfig(dtype="float32")
    assert engine.max_context == 256  # the LLM's max_position_embeddings


@pytest.mark.parametrize("model", ["specinfer_llm", "incremental_llm"])
def test_every_parameter_is_written_once(model):
    text = (ROOT / "model_repository" / model / "config.pbtxt").read_text()
    keys = [k for k, _ in PBTXT_PARAMETER.findall(text)]
    assert [k for k in keys if k in {p.key for p in PARAMETERS}] == [p.key for p in PARAMETERS]
    assert len(set(keys)) == len(keys)
    written = read_pbtxt_parameters(text)
    assert written["cuda_graphs"] == "" and written["max_context"] == str(RepositoryOptions.max_context)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_false_switches_graphs_off_on_cuda(repo):
    from specinfer.model.cuda_graphs import GraphedModel

    config = repo / "specinfer_llm" / "config.pbtxt"
    on = engine_from_config(config, {"device": "cuda", "attention": "triton"})
    off = engine_from_config(config, {"device": "cuda", "attention": "triton", "cuda_graphs": False})
    assert on.config.cuda_graphs and isinstance(on.llm.model, GraphedModel)
    assert not off.config.cuda_graphs and not isinstance(off.llm.model, GraphedModel)
