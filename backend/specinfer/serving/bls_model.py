"""``specinfer_bls``: the ``specinfer`` pipeline as a decoupled Python model calling its steps itself.

Triton 2.51 does not pass a client's cancellation (a cancelled gRPC stream, a closed SSE or HTTP
connection) on to the models inside an ensemble, nor to requests a model makes itself (its BLS
response iterator has no ``cancel``). This model sees its own request's cancellation: it checks it
after every decoding response, and a watcher checks every ``WATCH_SECONDS`` while none comes (a
queued request, a long prefill). Once cancelled, it sends the decoding model a ``stop`` request with
the request id it gave the decoding request, and the engine drops that request at its next iteration.
Each client request runs in its own thread, so a slow one holds up nobody.

The same model configured ``decoupled: false`` is the non-decoupled variant (``specinfer_unary``,
TensorRT-LLM's ``decoupled_mode: false``): plain ``infer()`` calls and perf_analyzer without
``--streaming`` reach it, it answers each request with exactly one response through the request's
response sender (so ``execute`` still returns at once and concurrent requests still meet in the one
decoding model's continuous batch), and it refuses ``stream=true``.
"""
from __future__ import annotations

import json
import threading
import traceback
import uuid
from dataclasses import dataclass, field

import numpy as np
import triton_python_backend_utils as pb_utils

from .errors import step_error_code
from .repository import (CLIENT_OUTPUTS, DECODE_OUTPUTS, POST_INPUTS, PRE_INPUTS, PRE_OUTPUTS, SAMPLING_INPUTS,
                         model_parameters)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
WATCH_SECONDS = 0.1


class StepFailed(Exception):
    """A step answered with an error; it goes to the client with that step's message and code (400 stays
    400: Triton 2.51 hands a BLS model every step error as INTERNAL, errors.py restores the code)."""

    def __init__(self, error) -> None:
        super().__init__(error.message())
        code = getattr(pb_utils.TritonError, step_error_code(error.message()))
        self.error = pb_utils.TritonError(error.message(), code)


@dataclass
class Job:
    id: str  # the decoding request's id, which a stop request names
    sender: object
    decoding: bool = False  # the decoding request is sent: a stop can reach it
    stopped: bool = False
    answered: bool = False  # the final response is sent: Triton frees the sender, nobody may touch it
    lock: threading.Lock = field(default_factory=threading.Lock)  # orders sends and the watcher's questions

    def send(self, response=None, final: bool = False) -> None:
        with self.lock:
            if self.answered:  # e.g. an error after the last response: the client has its answer
                return
            if response is None:
                self.sender.send(flags=FINAL)
            else:
                self.sender.send(response, flags=FINAL if final else 0)
            self.answered = self.answered or final or response is None

    def cancelled(self) -> bool:
        """Whether the client has gone; never asked once the final response is sent (Triton 2.51
        crashes in ResponseFactoryIsCancelled on a sender whose final response has gone)."""
        with self.lock:
            return not self.answered and self.sender.is_cancelled()


def tensors(values: dict[str, np.ndarray]) -> list:
    return [pb_utils.Tensor(name, value) for name, value in values.items()]


def outputs(response) -> dict[str, np.ndarray]:
    if response.has_error():
        raise StepFailed(response.error())
    return {t.name(): t.as_numpy() for t in response.output_tensors()}


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.decoder = model_parameters(args)["decoder"]
        policy = json.loads(args["model_config"]).get("model_transaction_policy", {})
        self.decoupled = bool(policy.get("decoupled", False))
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.watcher = threading.Thread(target=self.watch, name="specinfer-bls-watch", daemon=True)
        self.watcher.start()

    def execute(self, requests: list) -> None:
        for request in requests:
            inputs = {t.name(): np.array(t.as_numpy(), copy=True) for t in request.inputs()}
            job = Job(uuid.uuid4().hex, request.get_response_sender())
            with self.lock:
                self.jobs[job.id] = job
            threading.Thread(target=self.serve, args=(job, inputs), name=f"specinfer-bls-{job.id[:8]}",
                             daemon=True).start()
        return None

    def serve(self, job: Job, inputs: dict[str, np.ndarray]) -> None:
        try:
            self.run(job, inputs)
        except Exception as exc:
            if isinstance(exc, StepFailed):
                error = exc.error
            else:
                pb_utils.Logger.log_error(traceback.format_exc())
                error = pb_utils.TritonError("internal error in the BLS model; see the server log",
                                             pb_utils.TritonError.INTERNAL)
            if job.decoding:  # e.g. postprocessing failed mid-stream: nobody would read the rest
                self.stop(job)
            job.send(pb_utils.InferenceResponse(error=error), final=True)
        finally:
            with self.lock:
                self.jobs.pop(job.id, None)

    def run(self, job: Job, inputs: dict[str, np.ndarray]) -> None:
        stream = bool(inputs["stream"].any()) if "stream" in inputs else False
        n = int(inputs["num_return_sequences"].reshape(-1)[0]) if "num_return_sequences" in inputs else 1
        for asked, why in ((stream, "stream=true"), (n > 1, f"num_return_sequences {n}")):
            if asked and not self.decoupled:
                raise StepFailed(pb_utils.TritonError(
                    f"{why} needs a decoupled model (specinfer, specinfer_bls); this one sends one response",
                    pb_utils.TritonError.INVALID_ARG))
        pre = self.call("preprocessing", {n: inputs[n] for n in PRE_INPUTS if n in inputs}, PRE_OUTPUTS)
        decode_in = {n: pre[n] for n in PRE_OUTPUTS} | {n: inputs[n] for n, _ in SAMPLING_INPUTS if n in inputs}
        # decoding before exec, which returns with the first response: for a non-streamed request that is
        # the last, and a client gone before it must be stopped too (the decoding model keeps a stop
        # that overtakes its request)
        job.decoding = True
        responses = pb_utils.InferenceRequest(
            model_name=self.decoder, inputs=tensors(decode_in), requested_output_names=DECODE_OUTPUTS,
            request_id=job.id).exec(decoupled=True)
        final_sent, received = False, 0
        for response in responses:
            self.stop_if_cancelled(job)
            out = outputs(response)
            if not out:  # the decoding model's empty final response (a stopped request)
                continue
            post = self.call("postprocessing", {k: out[v] for k, v in POST_INPUTS.items()}, CLIENT_OUTPUTS)
            received += 1
            final_sent = not stream and received >= n  # non-streamed: one response per sequence, the last final
            job.send(pb_utils.InferenceResponse(output_tensors=tensors(post)), final=final_sent)
        if not final_sent:
            job.send()

    def call(self, model: str, inputs: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        request = pb_utils.InferenceRequest(model_name=model, inputs=tensors(inputs), requested_output_names=names)
        return outputs(request.exec())

    def stop_if_cancelled(self, job: Job) -> None:
        if not job.stopped and job.decoding and job.cancelled():
            self.stop(job)

    def stop(self, job: Job) -> None:
        """Have the decoding model drop this job's request (once; errors are logged, not raised)."""
        with self.lock:  # the watcher and the job's thread may both get here
            if job.stopped:
                return
            job.stopped = True
        try:
            stop = pb_utils.InferenceRequest(model_name=self.decoder, inputs=tensors({"stop": np.array([[True]])}),
                                             requested_output_names=[], request_id=job.id)
            for _ in stop.exec(decoupled=True):
                pass
        except Exception:  # e.g. the server is shutting down, which ends the request anyway
            pb_utils.Logger.log_error(traceback.format_exc())

    def watch(self) -> None:
        while not self.closing.wait(WATCH_SECONDS):
            with self.lock:
                jobs = list(self.jobs.values())
            for job in jobs:
                try:
                    self.stop_if_cancelled(job)
                except Exception:  # a sender that can no longer be asked: the watcher goes on
                    pb_utils.Logger.log_error(traceback.format_exc())

    def finalize(self) -> None:
        self.closing.set()
        self.watcher.join()
