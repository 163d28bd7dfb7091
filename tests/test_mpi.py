"""``mpiexec -n 2 python -m specinfer.parallel.mpi``: rank 0 leads, rank 1 is its tensor-parallel worker."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from conftest import prompts
from specinfer import SamplingParams, SpecInferEngine

MPIEXEC = Path(sys.executable).parent / "mpiexec"  # PyPI mpich, the `mpi` extra


def mpi_run(n: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(MPIEXEC), "-n", str(n), sys.executable, "-m", "specinfer.parallel.mpi",
                           "--master-addr", "127.0.0.1", *args], capture_output=True, text=True, timeout=300)


def test_two_mpi_ranks_give_greedy_speculative_output_equal_to_incremental_and_hugging_face(models):
    batch = prompts(3, seed=12)
    out = mpi_run(2, "--llm", str(models["llm"]), "--ssm", str(models["close"]), "--expansion", "1,2,1",
                  "--max-tokens", "12", *[f"--ids={','.join(map(str, p))}" for p in batch])
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(line) for line in out.stdout.splitlines()]
    engine = SpecInferEngine.from_pretrained(models["llm"])
    incremental = engine.generate(batch, SamplingParams(max_tokens=12), speculate=False)
    hf = LlamaForCausalLM.from_pretrained(models["llm"]).eval()
    for seq, got, inc in zip(batch, results, incremental, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([seq]), max_new_tokens=len(inc.token_ids), do_sample=False, pad_token_id=0)
        assert got["token_ids"] == inc.token_ids == ref[0, len(seq):].tolist()


def test_a_size_the_heads_do_not_allow_ends_the_whole_job(models):
    out = mpi_run(3, "--llm", str(models["llm"]), "--ids", "5,6,7")
    assert out.returncode != 0
    assert "tensor_parallel_size=3 does not split this LLM" in out.stderr and "sizes that work are [1, 2, 4]" in out.stderr
