"""Tensor parallelism for the LLM: Megatron-style shards over torch.distributed (gloo on CPU, NCCL
on CUDA), workers spawned by the engine or launched by MPI; the leader (rank 0) runs everything else."""
from .launch import MpiWorkers, SpawnedWorkers, WorkerFailure
from .leader import TensorParallelLLM

__all__ = ["MpiWorkers", "SpawnedWorkers", "TensorParallelLLM", "WorkerFailure"]
