"""User-facing settings, each validated in one place (its ``__post_init__``)."""
from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from .model.offload import OFFLOAD

DRAFT_SAMPLING = ("with_replacement", "without_replacement")
GREEDY_BELOW = 1e-5  # temperatures under this decode greedily: logits / T would overflow float32
VERIFIERS = ("mss", "naive", "gumbel")
ATTENTION = ("sdpa", "triton")
SSM_ENGINES = ("torch", "onnxruntime", "tensorrt")
PROPOSERS = ("suffix", "ssm", "head")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 CPUs whose matrix units compute bfloat16


@lru_cache(maxsize=1)
def cpu_computes_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (Linux x86 flags); elsewhere bfloat16 is emulated and slow."""
    if platform.system() != "Linux":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def resolve_dtype(dtype: str, device: str) -> str:
    """``"auto"``: bfloat16 on CUDA and on CPUs that compute it natively (a forward of 8 tokens then
    costs about what one does, which is what speculation needs), float32 elsewhere."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") or cpu_computes_bf16() else "float32"


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings; identical meaning for speculative and incremental decoding.

    ``temperature == 0`` is greedy, and so is any temperature below ``GREEDY_BELOW`` (sampling's
    limit as the temperature goes to 0; dividing logits by 1e-40 gives infinities). ``top_k == 0`` and ``top_p == 1`` disable those filters.
    Generation stops after ``max_tokens`` tokens or on a stop token (the tokenizer's EOS unless
    ``ignore_eos``, ``end_id``, any of ``stop_token_ids``, or the output ending with one of the
    token sequences in ``stop_sequences``); the stop token (or sequence) is part of the output.
    ``bad_sequences``, ``min_length`` and the three penalties change the target distribution from
    each token's context (``logits_processors.py``); their defaults change nothing.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    end_id: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    ignore_eos: bool = False
    bad_sequences: tuple[tuple[int, ...], ...] = ()
    min_length: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    log_probs: bool = False  # record each output token's log-probability under the target (log_probs.py)

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [0, 2**64) or None, got {self.seed!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop_sequences", tuple(tuple(s) for s in self.stop_sequences))
        if any(len(s) == 0 for s in self.stop_sequences):
            raise ValueError("stop_sequences must not contain an empty sequence")
        object.__setattr__(self, "bad_sequences", tuple(tuple(s) for s in self.bad_sequences))
        if any(len(s) == 0 for s in self.bad_sequences):
            raise ValueError("bad_sequences must not contain an empty sequence")
        if not isinstance(self.min_length, int) or self.min_length < 0:
            raise ValueError(f"min_length must be an integer >= 0, got {self.min_length!r}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number (0 disables it), got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def parse_proposers(text: str) -> tuple[str, ...]:
    """``"suffix,ssm"`` (command lines, config.pbtxt parameters) as a proposer tuple."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


@dataclass(frozen=True)
class SuffixConfig:
    """The suffix proposer (``proposers/suffix.py``): token trees read from text already seen.

    A request's tree continues the longest suffix of its tokens (up to ``max_match`` tokens) that
    occurred before, in its own prompt and output or in earlier requests' outputs (the global
    index, at most ``global_tokens`` tokens, oldest evicted first; 0: none). Continuations of the
    ``max_occurrences`` latest occurrences are counted; the tree keeps the ``max_nodes`` nodes most
    often continued whose share of the occurrences is at least ``min_probability``, at most
    ``depth_per_match`` x match length (and ``max_depth``) deep.
    """

    max_match: int = 8
    max_occurrences: int = 16
    max_nodes: int = 24
    min_probability: float = 0.1
    depth_per_match: float = 4.0  # 2.0 measured no better at batch 1 and ~6% slower on code (adaptive trees prune what does not pay)
    max_depth: int = 16
    global_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("max_match", "max_occurrences", "max_nodes", "max_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"suffix {name} must be an integer >= 1, got {value!r}")
        if not 0.0 < self.min_probability <= 1.0:
            raise ValueError(f"suffix min_probability must be in (0, 1], got {self.min_probability!r}")
        if not self.depth_per_match > 0:
            raise ValueError(f"suffix depth_per_match must be > 0, got {self.depth_per_match!r}")
        if not isinstance(self.global_tokens, int) or self.global_tokens < 0:
            raise ValueError(f"suffix global_tokens must be an integer >= 0, got {self.global_tokens!r}")


def level_widths(expansion: tuple[int, ...]) -> tuple[int, ...]:
    """Nodes at depths 1, 2, ... of a tree with ``expansion[d]`` children under every node of depth ``d``."""
    widths, width = [], 1
    for k in expansion:
        width *= k
        widths.append(width)
    return tuple(widths)


def parse_expansion(text: str) -> tuple[int, ...]:
    """``"1,1,3,1"`` (command lines, config.pbtxt parameters) as an expansion tuple."""
    try:
        return tuple(int(k) for k in text.split(","))
    except ValueError:
        raise ValueError(f"expansion must be comma-separated integers such as 1,1,3,1, got {text!r}") from None


@dataclass(frozen=True)
class TreeConfig:
    """Shape of the speculated token tree and how stochastic decoding drafts and verifies it.

    ``expansion[i]`` children are added under every leaf at speculation step ``i`` (SpecInfer's
    expansion configuration); with several SSMs each builds such a tree and they are merged.
    ``max_tree_tokens`` bounds the merged tree, root included.

    ``adaptive``: the expansion is the largest tree allowed; every step the engine decides how deep
    the SSMs draft (0: plain decoding) and which nodes the LLM verifies, from draft confidence and a
    cost model of the forwards measured on this machine (``adaptive.py``). Candidates are then
    selected by confidence, never sampled, for every request.

    ``proposers``: where draft nodes come from, any of ``"ssm"`` (the SSMs' expansion trees),
    ``"suffix"`` (``suffix``: continuations of text already seen, no model forward) and ``"head"``
    (the draft head reading the LLM's last hidden state, ``proposers/head.py``; its tree has
    ``head_expansion[d]`` children under every node of level ``d``); their trees are merged. With
    ``"suffix"`` or ``"head"`` every candidate is selected, never sampled.

    ``max_speculative_batch``: a step whose batch has more requests, those it admits included,
    decodes plainly (0: any batch speculates), as vLLM's ``disable_by_batch_size``: on a machine
    where verifying extra tokens beside other requests costs much, what speculation gains per step
    is lost to requests finishing at different steps, which no step's price sees.
    """

    expansion: tuple[int, ...] = (1, 1, 3, 1, 1, 1, 1, 1)
    max_tree_tokens: int = 128
    draft_sampling: str = "with_replacement"
    verifier: str = "mss"
    adaptive: bool = False
    proposers: tuple[str, ...] = ("ssm",)
    suffix: SuffixConfig = field(default_factory=SuffixConfig)
    max_speculative_batch: int = 0
    head_expansion: tuple[int, ...] = (3, 1, 1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "expansion", tuple(self.expansion))
        object.__setattr__(self, "proposers", tuple(self.proposers))
        object.__setattr__(self, "head_expansion", tuple(self.head_expansion))
        if not self.head_expansion or any(not isinstance(k, int) or k < 1 for k in self.head_expansion):
            raise ValueError(f"head_expansion must be integers >= 1 (children per node at each level), got {self.head_expansion!r}")
        unknown = [p for p in self.proposers if p not in PROPOSERS]
        if unknown or len(set(self.proposers)) != len(self.proposers):
            raise ValueError(f"proposers must be distinct names among {PROPOSERS}, got {self.proposers!r}")
        if not self.expansion:
            raise ValueError("expansion must name at least one speculation step, e.g. (1, 1, 3, 1)")
        for i, k in enumerate(self.expansion):
            if not isinstance(k, int) or k < 1:
                raise ValueError(f"expansion width at step {i} must be an integer >= 1, got {k!r}")
        if self.draft_sampling not in DRAFT_SAMPLING:
            raise ValueError(f"draft_sampling must be one of {DRAFT_SAMPLING}, got {self.draft_sampling!r}")
        if self.verifier not in VERIFIERS:
            raise ValueError(f"verifier must be one of {VERIFIERS}, got {self.verifier!r}")
        if not isinstance(self.max_speculative_batch, int) or self.max_speculative_batch < 0:
            raise ValueError(f"max_speculative_batch must be an integer >= 0 (0: any batch), got {self.max_speculative_batch!r}")
        self.check_size(1)

    @property
    def depth(self) -> int:
        return len(self.expansion)

    def level_widths(self) -> tuple[int, ...]:
        """Nodes one SSM proposes at most at each depth 1, 2, ..."""
        return level_widths(self.expansion)

    def nodes_per_ssm(self) -> int:
        """Draft nodes one SSM proposes at most (root excluded)."""
        return sum(self.level_widths())

    @property
    def selected(self) -> bool:
        """Every candidate is selected by confidence (adaptive trees, suffix and head trees), none sampled."""
        return self.adaptive or "suffix" in self.proposers or "head" in self.proposers

    def head_nodes(self) -> int:
        """Draft nodes the head proposes (root excluded)."""
        return sum(level_widths(self.head_expansion))

    def draft_nodes(self, num_ssms: int) -> tuple[int, int, int]:
        """The most draft nodes ``num_ssms`` SSMs, the suffix proposer and the head add to a merged tree."""
        return (num_ssms * self.nodes_per_ssm(), self.suffix.max_nodes if "suffix" in self.proposers else 0,
                self.head_nodes() if "head" in self.proposers else 0)

    def check_size(self, num_ssms: int) -> None:
        ssm, suffix, head = self.draft_nodes(num_ssms)
        size = 1 + ssm + suffix + head
        if size > self.max_tree_tokens:
            raise ValueError(
                f"expansion {self.expansion} with {num_ssms} SSM(s), {suffix} suffix and {head} head nodes builds up to "
                f"{size} tree tokens, more than max_tree_tokens={self.max_tree_tokens}"
            )


@dataclass(frozen=True)
class EngineConfig:
    """Capacity of one engine: concurrent requests and per-request context (KV-cache rows).

    ``attention``: ``"triton"`` (the tree-attention kernel, ``kernels/``) or ``"sdpa"`` (PyTorch's
    attention over a dense mask); ``None`` picks the kernel on CUDA and SDPA elsewhere. The kernel
    runs on CPU only under Triton's interpreter (``TRITON_INTERPRET=1``, for tests).
    ``ssm_engine``: what runs the SSMs (``runtimes/``): ``"torch"``, or their exported ONNX graph run by
    ``"onnxruntime"`` or ``"tensorrt"``. ``cuda_graphs``: replay the PyTorch models' forwards as CUDA
    graphs at bucketed shapes (``cuda_graphs.py``; with ``attention="triton"``); ``None``: on CUDA, unless the draft head proposes (it reads hidden states graphs do not return).
    ``offload``: ``"cpu"`` keeps the LLM's decoder layers in host memory and streams them to ``device``
    for every forward (``model/offload.py``), for an LLM larger than the GPU; ``"none"``: resident.
    ``batch_invariant``: the LLM's forwards give a token the same bits whatever shares them
    (``batch_invariance.py``), so greedy speculation is exact; the SSMs run their fastest shapes.
    """

    max_batch_size: int = 16
    max_context: int | None = None  # default: the LLM's max_position_embeddings
    device: str = "cpu"
    dtype: str = "float32"
    tree: TreeConfig = field(default_factory=TreeConfig)
    attention: str | None = None
    tensor_parallel_size: int = 1  # processes the LLM is sharded over (``parallel/``); SSMs stay on the leader
    ssm_engine: str = "torch"
    cuda_graphs: bool | None = None
    batch_invariant: bool = True
    offload: str = "none"

    def __post_init__(self) -> None:
        if self.offload not in OFFLOAD:
            raise ValueError(f"offload must be one of {OFFLOAD}, got {self.offload!r}")
        if self.offload != "none" and self.tensor_parallel_size != 1:
            raise ValueError("offload needs tensor_parallel_size=1: a sharded LLM is not streamed from host memory")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context must be >= 2, got {self.max_context}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, self.device))
        if self.attention is None:
            object.__setattr__(self, "attention", "sdpa" if self.device == "cpu" else "triton")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.ssm_engine not in SSM_ENGINES:
            raise ValueError(f"ssm_engine must be one of {SSM_ENGINES}, got {self.ssm_engine!r}")
        if self.cuda_graphs is None:  # (graphs do not return the hidden states the draft head reads)
            object.__setattr__(self, "cuda_graphs", self.device != "cpu" and self.offload == "none"
                               and "head" not in self.tree.proposers)
        if self.cuda_graphs and self.offload != "none":  # a forward is the weights' copy time: launches do not count
            raise ValueError("cuda_graphs=True does not combine with offload: leave cuda_graphs unset or False")
        if self.cuda_graphs and self.device == "cpu":
            raise ValueError("cuda_graphs=True needs a CUDA device")
        if self.attention == "triton" and self.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("attention='triton' needs a CUDA device (on CPU only under TRITON_INTERPRET=1, for tests)")
