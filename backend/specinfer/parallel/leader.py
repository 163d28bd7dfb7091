"""Rank 0 of a tensor-parallel LLM, standing in for a ``Transformer`` wherever the engine uses one.

``TensorParallelLLM`` has the attributes ``ModelRunner`` and the engine read (``args`` of the whole
model, ``lm_head.weight`` for the device and dtype, ``new_cache``) and ``Transformer.forward``'s call
signature. Each call broadcasts its inputs to the workers, then runs the leader's own shard, whose
collectives meet the workers'. The cache it hands out broadcasts ``move`` (the commit of accepted
nodes) the same way. A fault (a worker gone, a collective past its timeout, any error mid-forward)
fails that call with ``WorkerFailure``, kills the workers, and the next call starts new ones.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch

from ..model.attention import Visibility
from ..model.checkpoint import read_model_args
from ..config import DTYPES
from ..model.kv_cache import KVCache, Rows
from ..model import Transformer
from . import protocol
from .groups import connect
from .launch import MpiWorkers, SpawnedWorkers, WorkerFailure, WorkerSpec
from .layers import Collectives, Shard
from .protocol import Op
from .shard import check_size

Workers = SpawnedWorkers | MpiWorkers


class ShardedCache(KVCache):
    """The leader's shard of the KV cache; ``move`` is applied on every rank."""

    def __init__(self, llm: "TensorParallelLLM", rows: int, slots: int) -> None:
        a = llm.local.args
        p = llm.lm_head.weight
        super().__init__(a.num_hidden_layers, rows, slots, a.num_key_value_heads, a.head_dim, p.dtype, p.device)
        self.llm = llm

    def move(self, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        with self.llm.guard("commit"):
            protocol.send(self.llm.control, Op.MOVE, [], [rows, src, dst], self.llm.timeout)
            super().move(rows, src, dst)


class TensorParallelLLM:
    """The LLM sharded over ``size`` ranks; this process is rank 0 (see the module docstring)."""

    def __init__(self, llm: str | Path, size: int, device: str = "cpu", dtype: str = "float32",
                 workers: Workers | None = None) -> None:
        if size < 2:
            raise ValueError(f"a tensor-parallel LLM needs at least 2 ranks, got {size}")
        self.args = read_model_args(llm)
        check_size(self.args, size)
        self.spec = WorkerSpec(str(llm), size, device, dtype)
        self.workers = workers or SpawnedWorkers()
        self.timeout = timedelta(seconds=self.workers.timeout)
        self.comm = Collectives(0, size)
        self.control = None
        self.cache_shape: tuple[int, int] | None = None
        self.broken: str | None = None  # why the workers are gone, until they are restarted
        self.closed = False
        store = self.workers.launch(self.spec)  # the workers load their shards while the leader loads its own
        try:
            self.local = Transformer.from_pretrained(llm, device=device, dtype=DTYPES[dtype], shard=Shard(self.comm))
            self.connect(store)
        except BaseException:
            self.workers.stop(grace=0)
            raise
        self.lm_head = self.local.lm_head
        self.finalizer = weakref.finalize(self, self.workers.stop, 0)  # never leave workers behind

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers (engine-spawned ones), for operators and fault tests."""
        return list(self.workers.pids)

    def connect(self, store) -> None:
        self.workers.wait_ready(store, self.spec.size)
        self.control, self.comm.group = connect(store, 0, self.spec.size, torch.device(self.spec.device), self.timeout)
        if self.cache_shape is not None:
            protocol.send(self.control, Op.NEW_CACHE, list(self.cache_shape), [], self.timeout)

    @contextmanager
    def guard(self, what: str):
        """Run a step that involves every rank: restart workers if a fault stopped them, and turn
        any error into ``WorkerFailure`` after stopping the workers (their state is unknown)."""
        if self.closed:
            raise RuntimeError("the tensor-parallel LLM is closed")
        try:
            if self.broken is not None:
                self.restart()
            dead = self.workers.dead()
            if dead:
                raise WorkerFailure(dead)
            yield
        except BaseException as exc:
            self.broken = self.workers.dead(within=1.0) or f"{type(exc).__name__}: {exc}"  # a death explains it best
            self.comm.group = self.control = None
            self.workers.stop(grace=0)
            if not isinstance(exc, Exception):  # KeyboardInterrupt and the like pass as they are
                raise
            then = "the workers restart at the next forward" if self.workers.restartable else "restart the MPI job"
            raise WorkerFailure(
                f"tensor-parallel LLM {what} failed ({self.broken}); the requests in flight fail and {then}"
            ) from exc

    def restart(self) -> None:
        if not self.workers.restartable:
            raise WorkerFailure(f"tensor-parallel workers failed earlier ({self.broken}) and were launched "
                                "by mpiexec, which must start them again")
        self.connect(self.workers.launch(self.spec))
        self.broken = None

    def new_cache(self, rows: int, slots: int) -> ShardedCache:
        with self.guard("cache allocation"):
            protocol.send(self.control, Op.NEW_CACHE, [rows, slots], [], self.timeout)
            self.cache_shape = (rows, slots)
            return ShardedCache(self, rows, slots)

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: ShardedCache, rows: Rows,
        slots: torch.Tensor, visibility: Visibility, output_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``Transformer.forward`` over all ranks: logits ``[B, T, V]`` (or ``[B, V]``) on the leader."""
        with self.guard("forward"):
            scalars, tensors = protocol.forward_command(tokens, positions, rows, slots, visibility, output_index)
            protocol.send(self.control, Op.FORWARD, scalars, tensors, self.timeout)
            return self.local(tokens, positions, cache, rows, slots, visibility, output_index)

    def close(self) -> None:
        """Stop the workers (``STOP``, then kill after a grace period); idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.broken is None:
            try:
                protocol.send(self.control, Op.STOP, [], [], self.timeout)
            except RuntimeError:
                pass  # a worker already gone: stop() reaps or kills the rest
        self.control = self.comm.group = None
        self.workers.stop()
        self.finalizer.detach()
