"""Faults of tensor-parallel workers: a worker killed or hung mid-request fails the requests in flight
with ``WorkerFailure`` (no hang), the engine starts new workers for the next requests, and neither
``close`` nor the leader's death leaves a process behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import prompts
from specinfer import SamplingParams, SpecInferEngine, TreeConfig
from specinfer.parallel import SpawnedWorkers, WorkerFailure

TIMEOUT = 5.0  # seconds a collective waits for a hung rank (a loaded 2-core machine stalls for less)
PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by its parent, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids: list[int], within: float = 20.0) -> bool:
    end = time.monotonic() + within
    while any(alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.1)
    return not any(alive(p) for p in pids)


@pytest.fixture(scope="module")
def engine(models):
    engine = SpecInferEngine.from_pretrained(models["llm"], [models["close"]], tree=TreeConfig(expansion=(1, 2, 1)),
                                             tensor_parallel_size=2, workers=SpawnedWorkers(timeout=TIMEOUT))
    yield engine
    pids = engine.llm.model.pids
    engine.close()
    assert wait_gone(pids, within=0.5), "close() returned with a worker still running"


def fail_mid_request(engine: SpecInferEngine, fault) -> BaseException | None:
    """Start a long request, apply ``fault`` to a worker once it decodes; the request's error, or None."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            engine.generate(prompts(2, seed=3), SamplingParams(max_tokens=200, ignore_eos=True))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    before = engine.stats.verify_forwards
    thread = threading.Thread(target=run)
    thread.start()
    while engine.stats.verify_forwards < before + 2 and thread.is_alive():
        time.sleep(0.01)
    victim = engine.llm.model.pids[0]
    fault(victim)
    thread.join(timeout=120)
    assert not thread.is_alive(), "the request hung after its worker failed"
    assert not alive(victim) or wait_gone([victim])
    return errors[0] if errors else None


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_failed_worker_fails_the_request_and_the_next_one_is_served(engine, fault):
    expected = engine.generate(prompts(3, seed=9), PARAMS)
    sig = signal.SIGKILL if fault == "killed" else signal.SIGSTOP
    error = fail_mid_request(engine, lambda pid: os.kill(pid, sig))
    assert isinstance(error, WorkerFailure), error
    assert "signal SIGKILL" in str(error) if fault == "killed" else "Timed out" in str(error)
    assert not engine.scheduler.running and not engine.scheduler.waiting
    again = engine.generate(prompts(3, seed=9), PARAMS)  # new workers, started by this call
    assert [r.token_ids for r in again] == [r.token_ids for r in expected]


def test_a_worker_that_died_while_idle_fails_the_next_forward_clearly(engine):
    victim = engine.llm.model.pids[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_gone([victim])
    with pytest.raises(WorkerFailure, match=r"rank 1 \(pid \d+\) ended with signal SIGKILL"):
        engine.generate(prompts(1, seed=2), PARAMS)
    assert len(engine.generate(prompts(1, seed=2), PARAMS)[0].token_ids) == PARAMS.max_tokens


LEADER = """
import os, sys
from specinfer.parallel import TensorParallelLLM
llm = TensorParallelLLM(sys.argv[1], 2)
print(*llm.pids, flush=True)
os._exit(0)  # no close(): the leader vanishes
"""


def test_workers_exit_when_their_leader_dies(models):
    out = subprocess.run([sys.executable, "-c", LEADER, str(models["llm"])], capture_output=True, text=True,
                         timeout=300, check=True)
    pids = [int(p) for p in out.stdout.split()]
    assert pids and wait_gone(pids), f"workers {pids} outlived their leader"
