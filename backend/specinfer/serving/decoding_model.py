"""The decoupled Triton Python model that serves the SpecInfer engine: ``loop.RequestLoop`` (continuous
batching, cancellation, streaming, metrics) with Triton's tensors converted to and from it.

``execute`` only converts a request into a ``loop.Request`` and submits it; its response sender
becomes the request's ``Sink``. ``speculate=false`` in the model's parameters gives the
``incremental`` baseline: the same code and batching without SSMs.

A request leaves early when its client cancels it (Triton marks its response sender) or when a
request with ``stop=true`` and the same request id arrives: how ``specinfer_bls`` passes on its own
client's cancellation, which Triton 2.51 does not forward to the requests a model makes itself.
A stop request carrying the launcher's drain id (``errors.DRAIN_ID_ENV``) instead drains the loop:
every request fails with UNAVAILABLE and later ones are refused, the server is about to stop
(``launcher.Server.drain``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from ..config import PROPOSERS
from .errors import DRAIN_ID_ENV, step_error_code
from .loop import Request, RequestLoop, Response, run_in_thread
from .metrics import ServingMetrics
from .parameters import boolean, engine_from_parameters
from .repository import PERF_METRICS, SAMPLING_INPUTS, model_parameters
from .requests import Limits, require, sampling_from_inputs, scalar

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
INPUTS = ("input_ids", "stop_ids", "bad_ids", "max_tokens", "echo") + tuple(n for n, _ in SAMPLING_INPUTS)
REQUIRED = ("input_ids", "max_tokens")


def error_response(message: str, code: str | None = None):
    """``code``: a ``TritonError`` code name; by default the one ``errors.step_error_code`` gives the message."""
    error = pb_utils.TritonError(message, getattr(pb_utils.TritonError, code or step_error_code(message)))
    return pb_utils.InferenceResponse(error=error)


@dataclass
class TritonSink:
    """A request's response sender as the loop's ``Sink``; ``echo`` goes back with every response."""

    sender: object
    echo: bytes

    def send(self, r: Response) -> None:
        perf = [r.timing.arrival_ns, r.timing.scheduled_ns, r.timing.first_token_ns, r.timing.last_token_ns,
                1, 0, 1]  # one cache row
        outputs = [  # [1, ...]: the batch dimension (repository.MAX_BATCH)
            pb_utils.Tensor("output_ids", np.array([r.tokens], dtype=np.int32)),
            pb_utils.Tensor("context_ids", np.array([r.context], dtype=np.int32)),
            pb_utils.Tensor("echo", np.array([[self.echo]], dtype=np.object_)),
            pb_utils.Tensor("num_output_tokens", np.array([[r.output_tokens]], dtype=np.int32)),
            pb_utils.Tensor("num_llm_steps", np.array([[r.llm_steps]], dtype=np.int32)),
            pb_utils.Tensor("total_draft_tokens", np.array([[r.draft_tokens]], dtype=np.int32)),
            pb_utils.Tensor("total_accepted_draft_tokens", np.array([[r.accepted_draft_tokens]], dtype=np.int32)),
            pb_utils.Tensor("acceptance_rate", np.array([[r.acceptance_rate]], dtype=np.float32)),
            *(pb_utils.Tensor(f"accepted_draft_tokens_{name}", np.array([[r.accepted_by_proposer.get(name, 0)]],
                                                                        dtype=np.int32)) for name in PROPOSERS),
            pb_utils.Tensor("cum_log_probs", np.array([[r.cum_log_prob]], dtype=np.float32)),
            pb_utils.Tensor("output_log_probs", np.array([[r.log_probs]], dtype=np.float32).reshape(1, 1, -1)),
            pb_utils.Tensor("sequence_index", np.array([[r.index]], dtype=np.int32)),
        ] + [pb_utils.Tensor(name, np.array([[value]], dtype=np.int64)) for (name, _, _), value in zip(PERF_METRICS, perf)]
        self.sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL if r.final else 0)

    def end(self) -> None:
        self.sender.send(flags=FINAL)

    def fail(self, message: str) -> None:
        self.sender.send(error_response(message), flags=FINAL)

    def cancelled(self) -> bool:
        return self.sender.is_cancelled()


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = model_parameters(args)
        self.limits = Limits.from_parameters(params)
        self.model_name = args["model_name"]
        # built off the stub's main thread, which then never runs torch in parallel (``run_in_thread``)
        engine = run_in_thread(lambda: engine_from_parameters(params, Path(args["model_repository"])))
        if engine.tokenizer is None:
            raise pb_utils.TritonModelException(f"{params['llm']} has no tokenizer.json, which text serving needs")
        self.engine = engine
        self.metrics = ServingMetrics(pb_utils, self.model_name)
        speculate = boolean(params.get("speculate") or "true")
        # the launcher's drain id: a stop request with it drains the loop before the server stops
        self.drain_id = os.environ.get(DRAIN_ID_ENV, "")
        self.loop = RequestLoop(engine, speculate, self.metrics,
                                lambda message: pb_utils.Logger.log_error(f"{self.model_name}: {message}"))
        pb_utils.Logger.log_info(
            f"{self.model_name}: speculate={speculate} ssms={len(engine.ssms)} "
            f"tree={engine.tree.expansion} adaptive={engine.tree.adaptive} max_batch_size={engine.config.max_batch_size} "
            f"context={engine.max_context} kv_cache_tokens={engine.kv_cache_tokens}"
        )

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            stop = pb_utils.get_input_tensor_by_name(request, "stop")
            if stop is not None and stop.as_numpy().any():
                if self.drain_id and request.request_id() == self.drain_id:
                    self.loop.drain()
                else:
                    self.loop.stop(request.request_id())
                sender.send(flags=FINAL)
                continue
            tensors = {}
            for name in INPUTS:
                t = pb_utils.get_input_tensor_by_name(request, name)
                tensors[name] = None if t is None else t.as_numpy()
            try:
                self.loop.submit(self.to_request(tensors, request.request_id()), TritonSink(sender, self.echo(tensors)))
            except ValueError as exc:
                sender.send(error_response(str(exc), "INVALID_ARG"), flags=FINAL)
                self.metrics.rejected()
        return None

    def to_request(self, tensors: dict[str, np.ndarray | None], request_id: str) -> Request:
        require(tensors, REQUIRED)
        params, stream = sampling_from_inputs(tensors, self.limits)
        prompt = [int(t) for t in tensors["input_ids"].reshape(-1)]
        n = tensors["num_return_sequences"]
        return Request(prompt, params, int(scalar("num_return_sequences", n)) if n is not None else 1, stream, request_id)

    @staticmethod
    def echo(tensors: dict[str, np.ndarray | None]) -> bytes:
        """Passed back with every response for postprocessing (the prompt text or empty)."""
        return tensors["echo"].reshape(-1)[0] if tensors["echo"] is not None else b""

    def finalize(self) -> None:
        self.loop.close()
        self.engine.close()  # tensor-parallel workers end with the model
