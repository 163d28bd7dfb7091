"""The decoupled Triton Python model that runs the SpecInfer engine with continuous batching.

``execute`` only validates a request and queues it; one engine thread runs iterations while any
request is alive: newcomers join at the next iteration, one LLM forward verifies the trees of all
running requests, each request's accepted tokens are streamed right after its verification step,
and finished or cancelled requests leave at once. ``speculate=false`` in the model's parameters
gives the ``incremental`` baseline: the same code and batching without SSMs.

A request leaves early when its client cancels it (Triton marks its response sender) or when a
request with ``stop=true`` and the same request id arrives: how ``specinfer_bls`` passes on its own
client's cancellation, which Triton 2.51 does not forward to the requests a model makes itself.
A stop request carrying the launcher's drain id (``errors.DRAIN_ID_ENV``) instead fails every request
with UNAVAILABLE and refuses later ones: the server is about to stop (``launcher.Server.drain``).
"""
from __future__ import annotations

import os
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from ..config import PROPOSERS, SuffixConfig, TreeConfig, parse_expansion, parse_proposers
from ..engine import SpecInferEngine
from ..parallel import WorkerFailure
from ..sequence import Sequence
from .detokenize import sendable
from .errors import DRAIN_ID_ENV, ENGINE_FAILED, SHUTTING_DOWN, UNLOADING
from .metrics import ServingMetrics
from .repository import PERF_METRICS, SAMPLING_INPUTS, model_parameters, repository_path
from .requests import Limits, require, sampling_from_inputs, scalar

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
STOP_MEMORY_S = 30.0  # a stop may overtake the request it names (a BLS model cancelled while sending it)
INPUTS = ("input_ids", "stop_ids", "bad_ids", "max_tokens", "echo") + tuple(n for n, _ in SAMPLING_INPUTS)
REQUIRED = ("input_ids", "max_tokens")


@dataclass
class Group:
    """The sequences of one Triton request (``num_return_sequences``), which share its response sender:
    only the last one to end sends the final flag, and after an error none sends anything more."""

    members: list["Live"] = field(default_factory=list)
    open: int = 0  # members not ended yet
    closed: bool = False  # the final response (or an error) is sent

    def end(self) -> bool:
        """One member ended; whether it was the last (its response must carry the final flag)."""
        self.open -= 1
        return self.open == 0


@dataclass
class Live:
    seq: Sequence
    sender: object
    client_id: str  # the Triton request id ("" when the client gave none): a ``stop`` request names it
    stream: bool
    context: list[int]  # tokens before the next chunk (the prompt, then the last chunk sent)
    echo: bytes  # passed back with every response for postprocessing (the prompt text or empty)
    group: Group
    index: int = 0  # sequence_index within the group
    sent: int = 0
    seen: int = 0  # output length after the previous step, for the tokens-per-step histogram
    # TensorRT-LLM's perf metrics (ns since the epoch): execute() took it, the start of the engine
    # iteration that prefilled it, the end of that iteration, the end of the latest one that gave it tokens
    arrival_ns: int = field(default_factory=time.time_ns)
    scheduled_ns: int = 0
    first_token_ns: int = 0
    last_token_ns: int = 0


def engine_from_parameters(params: dict[str, str], model_dir: Path) -> tuple[SpecInferEngine, bool]:
    """Build the engine from config.pbtxt parameters; relative paths are relative to the repository."""
    ssms = [repository_path(s, model_dir) for s in params.get("ssms", "").split(",") if s.strip()]
    speculate = params.get("speculate", "true").lower() == "true"
    tree = TreeConfig(
        expansion=parse_expansion(params.get("expansion", "1,1,3,1,1,1,1,1")),
        max_tree_tokens=int(params.get("max_tree_tokens", 128)),
        draft_sampling=params.get("draft_sampling", "with_replacement"),
        verifier=params.get("verifier", "mss"),
        adaptive=params.get("adaptive", "false").lower() == "true",
        proposers=parse_proposers(params.get("proposers", "ssm")),
        suffix=SuffixConfig(global_tokens=int(params.get("suffix_global_tokens", 0))),
    )
    max_context = int(params["max_context"]) if params.get("max_context") else None
    engine = SpecInferEngine.from_pretrained(
        repository_path(params["llm"], model_dir), ssms if speculate else [], tree=tree, device=params.get("device", "cpu"),
        dtype=params.get("dtype", "auto"), max_batch_size=int(params.get("max_batch_size", 16)),
        max_context=max_context, attention=params.get("attention") or None,
        tensor_parallel_size=int(params.get("tensor_parallel_size", 1)), ssm_engine=params.get("ssm_engine") or "torch",
        offload=params.get("offload") or "none",
    )
    return engine, speculate


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = model_parameters(args)
        self.limits = Limits.from_parameters(params)
        self.model_name = args["model_name"]
        self.engine, self.speculate = engine_from_parameters(params, Path(args["model_repository"]))
        if self.engine.tokenizer is None:
            raise pb_utils.TritonModelException(f"{params['llm']} has no tokenizer.json, which text serving needs")
        self.metrics = ServingMetrics(pb_utils, self.model_name)
        self.incoming: list[Live] = []
        self.live: dict[int, Live] = {}
        self.stops: dict[str, float] = {}  # request ids named by stop requests -> when (monotonic), until matched
        self.cv = threading.Condition()
        self.stopping = False
        # the launcher's drain (a stop request with this id, before it stops the server): every request
        # in flight fails at once and new ones are refused, so that tritonserver has nothing left to wait for
        self.drain_id = os.environ.get(DRAIN_ID_ENV, "")
        self.draining = False
        self.drain_pending = False
        self.thread = threading.Thread(target=self.loop, name="specinfer-engine", daemon=True)
        self.thread.start()
        cache = self.engine.config.max_batch_size * self.engine.llm.cache.slots
        pb_utils.Logger.log_info(
            f"{self.model_name}: speculate={self.speculate} ssms={len(self.engine.ssms)} "
            f"tree={self.engine.tree.expansion} adaptive={self.engine.tree.adaptive} max_batch_size={self.engine.config.max_batch_size} "
            f"context={self.engine.max_context} kv_cache_tokens={cache}"
        )

    # ----- request intake (Triton's threads) --------------------------------------------------
    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            stop = pb_utils.get_input_tensor_by_name(request, "stop")
            if stop is not None and stop.as_numpy().any():
                with self.cv:
                    if self.drain_id and request.request_id() == self.drain_id:
                        self.draining = self.drain_pending = True
                    else:
                        self.stops[request.request_id()] = time.monotonic()
                    self.cv.notify()
                sender.send(flags=FINAL)
                continue
            try:
                group = self.parse(request, sender)
            except ValueError as exc:
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
                self.metrics.rejected()
                continue
            with self.cv:  # checked with the lock held: once the drain took the queue, nothing joins it
                refused = self.draining
                if not refused:
                    self.incoming += group.members
                    self.cv.notify()
            if refused:
                error = pb_utils.TritonError(SHUTTING_DOWN, pb_utils.TritonError.UNAVAILABLE)
                sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
        return None

    def parse(self, request, sender) -> Group:
        tensors = {}
        for name in INPUTS:
            t = pb_utils.get_input_tensor_by_name(request, name)
            tensors[name] = None if t is None else t.as_numpy()
        require(tensors, REQUIRED)
        params, stream = sampling_from_inputs(tensors, self.limits)
        prompt = [int(t) for t in tensors["input_ids"].reshape(-1)]
        n = tensors["num_return_sequences"]
        n = int(scalar("num_return_sequences", n)) if n is not None else 1
        if not 1 <= n <= self.engine.config.max_batch_size:
            raise ValueError(f"num_return_sequences must be in [1, {self.engine.config.max_batch_size}] "
                             f"(max_batch_size), got {n}")
        # n independent sequences; with a seed, sequence i draws from seed + i (the same seed would repeat one)
        seqs = [self.engine.new_sequence(prompt, params if params.seed is None else
                                         replace(params, seed=(params.seed + i) % 2**64)) for i in range(n)]
        echo = tensors["echo"].reshape(-1)[0] if tensors["echo"] is not None else b""
        group = Group(open=n)
        group.members = [Live(seq, sender, request.request_id(), stream, context=list(prompt), echo=echo, group=group,
                              index=i) for i, seq in enumerate(seqs)]
        return group

    # ----- the engine thread ------------------------------------------------------------------
    def loop(self) -> None:
        while True:
            with self.cv:
                while not (self.stopping or self.incoming or self.drain_pending or self.engine.scheduler.has_work()):
                    self.cv.wait()
                if self.stopping:
                    return
                incoming, self.incoming = self.incoming, []
                drain, self.drain_pending = self.drain_pending, False
                now = time.monotonic()
                self.stops = {k: t for k, t in self.stops.items() if now - t < STOP_MEMORY_S}
                stops = set(self.stops)
            try:
                if drain:
                    self.fail_all(incoming, SHUTTING_DOWN, pb_utils.TritonError.UNAVAILABLE)
                    continue
                matched = self.iterate(incoming, stops)
                with self.cv:
                    for key in matched:
                        self.stops.pop(key, None)
            except Exception as exc:  # a bug in a batched forward fails the requests in flight, never the server
                pb_utils.Logger.log_error(traceback.format_exc())
                message = f"{ENGINE_FAILED}: {exc}" if isinstance(exc, WorkerFailure) else f"{ENGINE_FAILED}; see the server log"
                self.fail_all([], message)
            finally:
                scheduler = self.engine.scheduler
                self.metrics.occupancy(len(scheduler.running), len(scheduler.waiting))

    def iterate(self, incoming: list[Live], stops: set[str]) -> set[str]:
        """Admit newcomers, drop cancelled requests, run one engine step, stream what it produced;
        returns the stop ids that named a request."""
        for live in incoming:
            self.engine.add(live.seq)
            self.live[live.seq.request_id] = live
        matched = {live.client_id for live in self.live.values() if live.client_id and live.client_id in stops}
        for live in list(self.live.values()):
            if live.client_id in matched or live.sender.is_cancelled():
                self.engine.abort(live.seq)
                self.finish(live)
                if live.group.end() and not live.group.closed:
                    live.group.closed = True
                    live.sender.send(flags=FINAL)
        before = (self.engine.stats.verify_forwards, self.engine.stats.verify_requests)
        started = time.time_ns()
        progressed = self.engine.step(self.speculate)
        ended = time.time_ns()
        stats = self.engine.stats
        self.metrics.forwards(stats.verify_forwards - before[0], stats.verify_requests - before[1])
        for seq in progressed:
            live = self.live.get(seq.request_id)
            if live is not None:
                if not live.scheduled_ns:
                    live.scheduled_ns, live.first_token_ns = started, ended
                live.last_token_ns = ended
                self.respond(live)
        return matched

    def respond(self, live: Live) -> None:
        seq = live.seq
        if seq.llm_steps > 1:  # a verification step, not the prefill
            self.metrics.step_tokens(len(seq.output) - live.seen, seq.tree_sizes[-1])
        live.seen = len(seq.output)
        pending = seq.output[live.sent:]
        if seq.error:
            pb_utils.Logger.log_error(f"{self.model_name}: request {live.client_id!r} failed alone: {seq.error}")
            self.fail(live, f"{ENGINE_FAILED} for this request; see the server log")
        elif seq.finished:
            self.finish(live)
            self.send(live, pending, final=live.group.end())
        elif live.stream:
            n = sendable(self.engine.tokenizer.decode, live.context, pending)
            if n:
                self.send(live, pending[:n], final=False)

    def send(self, live: Live, chunk: list[int], final: bool) -> None:
        seq = live.seq
        rate = seq.accepted_draft_tokens / seq.draft_tokens if seq.draft_tokens else 0.0
        end = live.sent + len(chunk)  # log-probs: the chunk's, and the sum up to its end (empty unless asked)
        chunk_log_probs, cum = seq.log_probs[live.sent:end], float(sum(seq.log_probs[:end]))
        perf = [live.arrival_ns, live.scheduled_ns, live.first_token_ns, live.last_token_ns, 1, 0, 1]  # one cache row
        outputs = [  # [1, ...]: the batch dimension (repository.MAX_BATCH)
            pb_utils.Tensor("output_ids", np.array([chunk], dtype=np.int32)),
            pb_utils.Tensor("context_ids", np.array([live.context], dtype=np.int32)),
            pb_utils.Tensor("echo", np.array([[live.echo]], dtype=np.object_)),
            pb_utils.Tensor("num_output_tokens", np.array([[len(seq.output)]], dtype=np.int32)),
            pb_utils.Tensor("num_llm_steps", np.array([[seq.llm_steps]], dtype=np.int32)),
            pb_utils.Tensor("total_draft_tokens", np.array([[seq.draft_tokens]], dtype=np.int32)),
            pb_utils.Tensor("total_accepted_draft_tokens", np.array([[seq.accepted_draft_tokens]], dtype=np.int32)),
            pb_utils.Tensor("acceptance_rate", np.array([[rate]], dtype=np.float32)),
            *(pb_utils.Tensor(f"accepted_draft_tokens_{name}", np.array([[seq.accepted_by_proposer[name]]], dtype=np.int32))
              for name in PROPOSERS),
            pb_utils.Tensor("cum_log_probs", np.array([[cum]], dtype=np.float32)),
            pb_utils.Tensor("output_log_probs", np.array([[chunk_log_probs]], dtype=np.float32).reshape(1, 1, -1)),
            pb_utils.Tensor("sequence_index", np.array([[live.index]], dtype=np.int32)),
        ] + [pb_utils.Tensor(name, np.array([[value]], dtype=np.int64)) for (name, _, _), value in zip(PERF_METRICS, perf)]
        if live.group.closed:  # a sibling failed: the client has its answer
            return
        live.group.closed = final
        live.sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL if final else 0)
        live.sent += len(chunk)
        if chunk:
            live.context = chunk

    def finish(self, live: Live, failed: bool = False) -> None:
        self.live.pop(live.seq.request_id, None)
        self.metrics.finished(live.seq, failed)

    def fail_all(self, incoming: list[Live], message: str, code=None) -> None:
        """End every request in the engine and those not yet admitted with an error."""
        for live in list(self.live.values()):
            self.engine.abort(live.seq)
            self.fail(live, message, code)
        for live in incoming:
            self.fail(live, message, code)
        self.engine.scheduler.retire()

    def fail(self, live: Live, message: str, code=None) -> None:
        """End ``live`` with an error, and its siblings with it: one response ends their shared request."""
        group = live.group
        if group.closed:  # a sibling failed first and ended this one too
            return
        group.closed = True
        for member in group.members:
            if member is live:
                self.finish(live, failed=True)
            elif member.seq.request_id in self.live:
                self.engine.abort(member.seq)
                self.finish(member)
        error = pb_utils.TritonError(message, pb_utils.TritonError.INTERNAL if code is None else code)
        live.sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)

    def finalize(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join()  # it stops after the current iteration; only then is self.live ours
        for live in list(self.live.values()) + self.incoming:
            self.fail(live, UNLOADING, pb_utils.TritonError.UNAVAILABLE)
        self.engine.close()  # tensor-parallel workers end with the model
