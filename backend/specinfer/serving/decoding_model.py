"""The decoupled Triton Python model that runs the SpecInfer engine with continuous batching.

``execute`` only validates a request and queues it; one engine thread runs iterations while any
request is alive: newcomers join at the next iteration, one LLM forward verifies the trees of all
running requests, each request's accepted tokens are streamed right after its verification step,
and finished or cancelled requests leave at once. ``speculate=false`` in the model's parameters
gives the ``incremental`` baseline: the same code and batching without SSMs.

A request leaves early when its client cancels it (Triton marks its response sender) or when a
request with ``stop=true`` and the same request id arrives: how ``specinfer_bls`` passes on its own
client's cancellation, which Triton 2.51 does not forward to the requests a model makes itself.
"""
from __future__ import annotations

import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from ..config import TreeConfig, parse_expansion
from ..engine import SpecInferEngine
from ..parallel import WorkerFailure
from ..sequence import Sequence
from .detokenize import sendable
from .metrics import ServingMetrics
from .repository import model_parameters, repository_path
from .requests import Limits, require, sampling_from_inputs

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
INPUTS = ("input_ids", "stop_ids", "max_tokens", "stream", "temperature", "top_k", "top_p", "random_seed", "end_id")
REQUIRED = ("input_ids", "max_tokens")


@dataclass
class Live:
    seq: Sequence
    sender: object
    client_id: str  # the Triton request id ("" when the client gave none): a ``stop`` request names it
    stream: bool
    context: list[int]  # tokens before the next chunk (the prompt, then the last chunk sent)
    sent: int = 0
    seen: int = 0  # output length after the previous step, for the tokens-per-step histogram


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
    )
    max_context = int(params["max_context"]) if params.get("max_context") else None
    engine = SpecInferEngine.from_pretrained(
        repository_path(params["llm"], model_dir), ssms if speculate else [], tree=tree, device=params.get("device", "cpu"),
        dtype=params.get("dtype", "float32"), max_batch_size=int(params.get("max_batch_size", 16)),
        max_context=max_context, attention=params.get("attention") or None,
        tensor_parallel_size=int(params.get("tensor_parallel_size", 1)), ssm_engine=params.get("ssm_engine") or "torch",
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
        self.stops: set[str] = set()  # request ids named by stop requests since the last iteration
        self.cv = threading.Condition()
        self.stopping = False
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
                    self.stops.add(request.request_id())
                    self.cv.notify()
                sender.send(flags=FINAL)
                continue
            try:
                live = self.parse(request, sender)
            except ValueError as exc:
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
                self.metrics.rejected()
                continue
            with self.cv:
                self.incoming.append(live)
                self.cv.notify()
        return None

    def parse(self, request, sender) -> Live:
        tensors = {}
        for name in INPUTS:
            t = pb_utils.get_input_tensor_by_name(request, name)
            tensors[name] = None if t is None else t.as_numpy()
        require(tensors, REQUIRED)
        params, stream = sampling_from_inputs(tensors, self.limits)
        prompt = [int(t) for t in tensors["input_ids"].reshape(-1)]
        seq = self.engine.new_sequence(prompt, params)
        return Live(seq, sender, request.request_id(), stream, context=prompt)

    # ----- the engine thread ------------------------------------------------------------------
    def loop(self) -> None:
        while True:
            with self.cv:
                while not self.stopping and not self.incoming and not self.engine.scheduler.has_work():
                    self.cv.wait()
                if self.stopping:
                    return
                incoming, self.incoming = self.incoming, []
                stops, self.stops = self.stops, set()
            try:
                self.iterate(incoming, stops)
            except Exception as exc:  # a bug in a batched forward fails the requests in flight, never the server
                pb_utils.Logger.log_error(traceback.format_exc())
                message = str(exc) if isinstance(exc, WorkerFailure) else "internal error in the decoding engine; see the server log"
                for live in list(self.live.values()):
                    self.engine.abort(live.seq)
                    self.fail(live, message)
                self.engine.scheduler.retire()
            finally:
                scheduler = self.engine.scheduler
                self.metrics.occupancy(len(scheduler.running), len(scheduler.waiting))

    def iterate(self, incoming: list[Live], stops: set[str]) -> None:
        """Admit newcomers, drop cancelled requests, run one engine step, stream what it produced."""
        for live in incoming:
            self.engine.add(live.seq)
            self.live[live.seq.request_id] = live
        for live in list(self.live.values()):
            if (live.client_id and live.client_id in stops) or live.sender.is_cancelled():
                self.engine.abort(live.seq)
                self.finish(live)
                live.sender.send(flags=FINAL)
        before = (self.engine.stats.verify_forwards, self.engine.stats.verify_requests)
        progressed = self.engine.step(self.speculate)
        stats = self.engine.stats
        self.metrics.forwards(stats.verify_forwards - before[0], stats.verify_requests - before[1])
        for seq in progressed:
            live = self.live.get(seq.request_id)
            if live is not None:
                self.respond(live)

    def respond(self, live: Live) -> None:
        seq = live.seq
        if seq.llm_steps > 1:  # a verification step, not the prefill
            self.metrics.step_tokens(len(seq.output) - live.seen, seq.tree_sizes[-1])
        live.seen = len(seq.output)
        pending = seq.output[live.sent:]
        if seq.error:
            pb_utils.Logger.log_error(f"{self.model_name}: request {live.client_id!r} failed alone: {seq.error}")
            self.fail(live, "internal error in the decoding engine for this request; see the server log")
        elif seq.finished:
            self.send(live, pending, final=True)
            self.finish(live)
        elif live.stream:
            n = sendable(self.engine.tokenizer.decode, live.context, pending)
            if n:
                self.send(live, pending[:n], final=False)

    def send(self, live: Live, chunk: list[int], final: bool) -> None:
        seq = live.seq
        rate = seq.accepted_draft_tokens / seq.draft_tokens if seq.draft_tokens else 0.0
        outputs = [
            pb_utils.Tensor("output_ids", np.array(chunk, dtype=np.int32)),
            pb_utils.Tensor("context_ids", np.array(live.context, dtype=np.int32)),
            pb_utils.Tensor("num_output_tokens", np.array([len(seq.output)], dtype=np.int32)),
            pb_utils.Tensor("num_llm_steps", np.array([seq.llm_steps], dtype=np.int32)),
            pb_utils.Tensor("total_draft_tokens", np.array([seq.draft_tokens], dtype=np.int32)),
            pb_utils.Tensor("total_accepted_draft_tokens", np.array([seq.accepted_draft_tokens], dtype=np.int32)),
            pb_utils.Tensor("acceptance_rate", np.array([rate], dtype=np.float32)),
        ]
        live.sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL if final else 0)
        live.sent += len(chunk)
        if chunk:
            live.context = chunk

    def finish(self, live: Live, failed: bool = False) -> None:
        self.live.pop(live.seq.request_id, None)
        self.metrics.finished(live.seq, failed)

    def fail(self, live: Live, message: str) -> None:
        self.finish(live, failed=True)
        error = pb_utils.TritonError(message, pb_utils.TritonError.INTERNAL)
        live.sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)

    def finalize(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join()  # it stops after the current iteration; only then is self.live ours
        for live in list(self.live.values()) + self.incoming:
            self.fail(live, "the model is being unloaded")
        self.engine.close()  # tensor-parallel workers end with the model
