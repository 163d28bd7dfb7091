"""How a tensor-parallel LLM's workers start: spawned by the engine, or already running under MPI."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from .groups import leader_store, rank_device


class WorkerFailure(RuntimeError):
    """A tensor-parallel worker died, hung past the timeout, or could not start."""


@dataclass(frozen=True)
class WorkerSpec:
    llm: str
    size: int
    device: str  # the leader's
    dtype: str


def python_executable() -> str:
    """This environment's interpreter, also inside Triton's Python backend stub (whose
    ``sys.executable`` is not a Python interpreter)."""
    if Path(sys.executable).name.startswith("python"):
        return sys.executable
    candidate = Path(sys.prefix) / "bin" / "python3"
    return str(candidate) if candidate.is_file() else (shutil.which("python3") or "python3")


class SpawnedWorkers:
    """Workers the leader starts as child processes on this machine (one GPU each on CUDA)."""

    restartable = True

    def __init__(self, timeout: float = 10.0, start_timeout: float = 600.0) -> None:
        self.timeout = timeout  # seconds a collective waits for another rank before failing
        self.start_timeout = start_timeout
        self.procs: list[subprocess.Popen] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def launch(self, spec: WorkerSpec) -> dist.Store:
        store = leader_store("127.0.0.1", spec.size, timedelta(seconds=self.start_timeout))
        self.procs = [
            subprocess.Popen(
                [python_executable(), "-m", "specinfer.parallel.worker", "--store", f"127.0.0.1:{store.port}",
                 "--rank", str(rank), "--size", str(spec.size), "--llm", spec.llm,
                 "--device", str(rank_device(spec.device, rank)), "--dtype", spec.dtype,
                 "--timeout", str(self.timeout), "--parent", str(os.getpid())],
                stdin=subprocess.DEVNULL)
            for rank in range(1, spec.size)
        ]
        return store

    def wait_ready(self, store: dist.Store, size: int) -> None:
        """Until every worker has loaded its shard; a worker that exits first fails the start."""
        keys = [f"ready/{rank}" for rank in range(1, size)]
        deadline = time.monotonic() + self.start_timeout
        while not store.check(keys):
            dead = self.dead()
            if dead:
                raise WorkerFailure(f"tensor-parallel worker failed to start: {dead}")
            if time.monotonic() > deadline:
                raise WorkerFailure(f"tensor-parallel workers not ready after {self.start_timeout:.0f} s")
            time.sleep(0.05)

    def dead(self, within: float = 0.0) -> str | None:
        """Which worker has exited (and how), if any, waiting up to ``within`` seconds for one to."""
        deadline = time.monotonic() + within
        while True:
            for rank, p in enumerate(self.procs, start=1):
                code = p.poll()
                if code is not None:
                    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                    return f"worker rank {rank} (pid {p.pid}) ended with {how}"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def stop(self, grace: float = 5.0) -> None:
        """Wait up to ``grace`` seconds for the workers to exit (after ``STOP``), then kill them."""
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []


class MpiWorkers:
    """Workers ``mpiexec`` started (ranks >= 1 running ``parallel.mpi``); the leader is rank 0. They
    cannot be restarted from here: after a fault the job must be started again."""

    restartable = False

    def __init__(self, comm, host: str, timeout: float = 10.0, start_timeout: float = 600.0) -> None:
        self.comm, self.host = comm, host  # an mpi4py communicator; the address workers reach rank 0 at
        self.timeout, self.start_timeout = timeout, start_timeout
        self.pids: list[int] = []

    def launch(self, spec: WorkerSpec) -> dist.Store:
        if self.comm.size != spec.size:
            raise ValueError(f"tensor_parallel_size={spec.size} but mpiexec started {self.comm.size} processes")
        store = leader_store(self.host, spec.size, timedelta(seconds=self.start_timeout))
        self.comm.bcast(f"{self.host}:{store.port}", root=0)
        return store

    def wait_ready(self, store: dist.Store, size: int) -> None:
        store.wait([f"ready/{rank}" for rank in range(1, size)])

    def dead(self, within: float = 0.0) -> str | None:
        del within
        return None  # other hosts' processes: a failure shows as a closed connection or a timeout

    def stop(self, grace: float = 5.0) -> None:
        del grace  # they exit on STOP or when the leader's connection closes; mpiexec reaps them
