"""Tiny Llama checkpoints, made by the tests with Hugging Face ``transformers`` (no downloads)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (attention="triton") run under Triton's interpreter here. It must be chosen before
    # anything imports triton, and transformers does at import.
    os.environ["TRITON_INTERPRET"] = "1"

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from specinfer.cost_model import FixedCosts  # noqa: E402

VOCAB = 96


def make_llama(folder: Path, seed: int, vocab: int = VOCAB, noise_from: Path | None = None, noise: float = 0.0,
               shard: str | None = None, **overrides) -> Path:
    """Save a random Llama to ``folder``; with ``noise_from``, a perturbed copy of that checkpoint.

    ``initializer_range`` is large so logits are far apart: greedy comparisons never hinge on
    float rounding between differently shaped (but mathematically equal) computations.
    """
    torch.manual_seed(seed)
    if noise_from is not None:
        model = LlamaForCausalLM.from_pretrained(noise_from)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p) * p.std())
    else:
        cfg = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   initializer_range=0.15, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
        cfg.update(overrides)
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    kwargs = {"max_shard_size": shard} if shard else {}
    model.eval().save_pretrained(folder, **kwargs)
    return folder


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """An LLM, a perturbed copy (partial acceptance), and a smaller unrelated SSM."""
    root = tmp_path_factory.mktemp("models")
    llm = make_llama(root / "llm", seed=0)
    return {
        "llm": llm,
        "close": make_llama(root / "close", seed=1, noise_from=llm, noise=0.25),
        "other": make_llama(root / "other", seed=2, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1),
    }


def trees_pay(engine) -> None:
    """Give adaptive trees fixed costs under which drafts pay (not this loaded machine's timings),
    uncorrected by real step times, so that exactness tests verify trees."""
    engine.llm.costs = FixedCosts(lambda n: 1.0 + 0.001 * n)
    if engine.policy is not None:
        engine.policy.rates.observe = lambda *args: None
    for runner in engine.ssms:
        runner.costs = FixedCosts(lambda n: 0.05)


def prompts(n: int, seed: int = 0, vocab: int = VOCAB, lo: int = 1, hi: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lengths]


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """One real tritonserver for every test that needs one: (server, reference engine, repository)."""
    from served import serve

    # Static trees: these tests check what speculation reports; test_served_adaptive.py serves adaptive ones.
    yield from serve(tmp_path_factory.mktemp("served"), "--no-adaptive", "--proposers", "ssm")
