"""The request loop around the engine, without Triton: continuous batching for any front end.

``submit`` only validates a request and queues it; one thread runs engine iterations while any
request is alive: newcomers join at the next iteration, one LLM forward verifies the trees of all
running requests, each request's new tokens go to its ``Sink`` right after its verification step
(streamed requests: as soon as they decode to whole characters, ``detokenize.sendable``), and
finished or cancelled requests leave at once.

A request of ``n`` sequences (``num_return_sequences``) shares one sink: only the last sequence to
end sends the final response, and a failure ends the request with one error and stops its other
sequences (the sink has no answer left to give them); other requests go on untouched. A request
leaves early when its sink reports it cancelled or when ``stop`` names its ``client_id``; ``drain``
fails every request with ``SHUTTING_DOWN`` and refuses later ones; ``close`` fails what is left with
``UNLOADING``. The loop reads the engine through its public methods only.

``decoding_model.py`` converts Triton's tensors to a ``Request`` and each ``Response`` back;
Python callers and tests use ``Responses``, a sink over a queue.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar

from ..config import SamplingParams
from ..engine import SpecInferEngine
from ..parallel import WorkerFailure
from ..sequence import Sequence
from .detokenize import sendable
from .errors import ENGINE_FAILED, SHUTTING_DOWN, UNLOADING

STOP_MEMORY_S = 30.0  # a stop may overtake the request it names (a BLS model cancelled while sending it)
log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Request:
    """One client request: ``n`` independent sequences continuing ``prompt``; with a seed, sequence
    i draws from seed + i (the same seed would repeat one). ``client_id``: what ``stop`` names it by."""

    prompt: list[int]
    params: SamplingParams
    n: int = 1
    stream: bool = False
    client_id: str = ""


@dataclass(frozen=True)
class Timing:
    """TensorRT-LLM's perf metrics (ns since the epoch): ``submit`` took the request, the start of
    the engine iteration that prefilled it, the end of that iteration, the end of the latest one
    that gave it tokens."""

    arrival_ns: int
    scheduled_ns: int
    first_token_ns: int
    last_token_ns: int


@dataclass(frozen=True)
class Response:
    """New tokens of one sequence of a request, with its totals so far."""

    index: int  # the sequence within its request
    tokens: list[int]
    context: list[int]  # the tokens before ``tokens`` (the prompt, then the previous response's): detokenise the delta
    final: bool  # the request's last response
    output_tokens: int
    llm_steps: int
    draft_tokens: int
    accepted_draft_tokens: int
    accepted_by_proposer: dict[str, int]
    log_probs: list[float]  # of ``tokens``, where the request asked for them
    cum_log_prob: float  # of the output up to the end of ``tokens``
    timing: Timing

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else 0.0


class Sink(Protocol):
    """Where one request's responses go (Triton's response sender, a queue)."""

    def send(self, response: Response) -> None: ...

    def end(self) -> None:
        """The request ended with no more tokens to send (stopped or cancelled)."""

    def fail(self, message: str) -> None:
        """The request ended with an error (``errors.step_error_code`` gives its code)."""

    def cancelled(self) -> bool: ...


class Metrics(Protocol):
    """What the loop reports each iteration (``metrics.ServingMetrics`` for Triton)."""

    def finished(self, seq: Sequence, failed: bool = False) -> None: ...

    def forwards(self, forwards: int, requests: int, prefills: int) -> None: ...

    def busy(self, step_seconds: float, forward_seconds: float) -> None: ...

    def occupancy(self, running: int, waiting: int) -> None: ...

    def step_tokens(self, n: int) -> None: ...

    def tree_sizes(self, sizes: Counter) -> None: ...


class NoMetrics:
    def finished(self, seq: Sequence, failed: bool = False) -> None:
        pass

    def forwards(self, forwards: int, requests: int, prefills: int) -> None:
        pass

    def busy(self, step_seconds: float, forward_seconds: float) -> None:
        pass

    def occupancy(self, running: int, waiting: int) -> None:
        pass

    def step_tokens(self, n: int) -> None:
        pass

    def tree_sizes(self, sizes: Counter) -> None:
        pass


class RequestFailed(RuntimeError):
    pass


class Responses:
    """A ``Sink`` over a queue: iterate it for a request's responses (``RequestFailed`` on an error)."""

    def __init__(self, timeout: float | None = None) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.timeout = timeout
        self.cancel_asked = threading.Event()

    def send(self, response: Response) -> None:
        self.queue.put(response)

    def end(self) -> None:
        self.queue.put(None)

    def fail(self, message: str) -> None:
        self.queue.put(RequestFailed(message))

    def cancelled(self) -> bool:
        return self.cancel_asked.is_set()

    def cancel(self) -> None:
        self.cancel_asked.set()

    def __iter__(self) -> Iterator[Response]:
        while True:
            item = self.queue.get(timeout=self.timeout)
            if isinstance(item, RequestFailed):
                raise item
            if item is None:
                return
            yield item
            if item.final:
                return


@dataclass
class Group:
    """The sequences of one request, which share its sink."""

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
    sink: Sink
    client_id: str
    stream: bool
    context: list[int]  # tokens before the next chunk (the prompt, then the last chunk sent)
    group: Group
    index: int = 0
    sent: int = 0
    seen: int = 0  # output length after the previous step, for the tokens-per-step histogram
    arrival_ns: int = field(default_factory=time.time_ns)
    scheduled_ns: int = 0
    first_token_ns: int = 0
    last_token_ns: int = 0


def run_in_thread(fn: Callable[[], T]) -> T:
    """``fn()`` in a thread of its own: its result, or its exception raised here. On CPU, once a
    process's main thread has run torch in parallel, every other thread's parallel regions cost
    about 150 us more each (small bfloat16 linears 4x slower, measured); a server builds its engine
    this way, so that only the loop's thread ever runs torch in parallel."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller as it is
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="specinfer-build")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


class RequestLoop:
    """Continuous batching over ``engine`` in a thread of its own, from ``submit`` to each ``Sink``."""

    def __init__(self, engine: SpecInferEngine, speculate: bool = True, metrics: Metrics | None = None,
                 log_error: Callable[[str], None] = log.error) -> None:
        self.engine, self.speculate = engine, speculate
        self.metrics = metrics or NoMetrics()
        self.log_error = log_error
        self.incoming: list[Live] = []
        self.live: dict[int, Live] = {}
        self.stops: dict[str, float] = {}  # client ids named by ``stop`` -> when (monotonic), until matched
        self.cv = threading.Condition()
        self.stopping = False
        self.draining = False  # every request in flight fails at once, new ones are refused
        self.drain_pending = False
        self.stats = engine.stats_snapshot()  # after the previous iteration
        self.thread = threading.Thread(target=self.run, name="specinfer-engine", daemon=True)
        self.thread.start()

    # ----- callers' threads -------------------------------------------------------------------
    def submit(self, request: Request, sink: Sink) -> None:
        """Queue ``request`` (``ValueError`` naming the field if it is invalid: nothing queued)."""
        limit = self.engine.config.max_batch_size
        if not 1 <= request.n <= limit:
            raise ValueError(f"num_return_sequences must be in [1, {limit}] (max_batch_size), got {request.n}")
        params = request.params
        seqs = [self.engine.new_sequence(request.prompt, params if params.seed is None else
                                         replace(params, seed=(params.seed + i) % 2**64)) for i in range(request.n)]
        group = Group(open=request.n)
        group.members = [Live(seq, sink, request.client_id, request.stream, list(request.prompt), group, index=i)
                         for i, seq in enumerate(seqs)]
        with self.cv:  # checked with the lock held: once the drain took the queue, nothing joins it
            refused = self.draining
            if not refused:
                self.incoming += group.members
                self.cv.notify()
        if refused:
            sink.fail(SHUTTING_DOWN)

    def stop(self, client_id: str) -> None:
        """End the request submitted with ``client_id`` at the next iteration (one arriving within
        ``STOP_MEMORY_S`` ends at once)."""
        with self.cv:
            self.stops[client_id] = time.monotonic()
            self.cv.notify()

    def drain(self) -> None:
        """Fail every request in flight with ``SHUTTING_DOWN`` and refuse later ones: the server is
        about to stop, and has nothing left to wait for."""
        with self.cv:
            self.draining = self.drain_pending = True
            self.cv.notify()

    def close(self) -> None:
        """Stop the thread after its current iteration and fail what is left with ``UNLOADING``
        (the engine stays open: its owner closes it)."""
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join()  # only then are self.live and self.incoming ours
        for live in list(self.live.values()) + self.incoming:
            self.fail(live, UNLOADING)

    # ----- the loop's thread ------------------------------------------------------------------
    def run(self) -> None:
        while True:
            with self.cv:
                while not (self.stopping or self.incoming or self.drain_pending or self.engine.has_work()):
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
                    self.fail_all(incoming, SHUTTING_DOWN)
                    continue
                matched = self.iterate(incoming, stops)
                with self.cv:
                    for key in matched:
                        self.stops.pop(key, None)
            except Exception as exc:  # a bug in a batched forward fails the requests in flight, never the server
                self.log_error(traceback.format_exc())
                self.fail_all([], f"{ENGINE_FAILED}: {exc}" if isinstance(exc, WorkerFailure)
                              else f"{ENGINE_FAILED}; see the server log")
            finally:
                self.metrics.occupancy(*self.engine.occupancy())

    def iterate(self, incoming: list[Live], stops: set[str]) -> set[str]:
        """Admit newcomers, drop cancelled requests, run one engine step, send what it produced;
        returns the stop ids that named a request."""
        for live in incoming:
            self.engine.add(live.seq)
            self.live[live.seq.request_id] = live
        matched = {live.client_id for live in self.live.values() if live.client_id and live.client_id in stops}
        for live in list(self.live.values()):
            if live.client_id in matched or live.sink.cancelled():
                self.engine.abort(live.seq)
                self.finish(live)
                if live.group.end() and not live.group.closed:
                    live.group.closed = True
                    live.sink.end()
        started = time.time_ns()
        progressed = self.engine.step(self.speculate)
        ended = time.time_ns()
        before, self.stats = self.stats, self.engine.stats_snapshot()
        self.metrics.forwards(self.stats.verify_forwards - before.verify_forwards,
                              self.stats.verify_requests - before.verify_requests,
                              self.stats.prefill_forwards - before.prefill_forwards)
        self.metrics.busy(self.stats.step_seconds - before.step_seconds,
                          self.stats.forward_seconds - before.forward_seconds)
        self.metrics.tree_sizes(self.stats.tree_sizes - before.tree_sizes)
        for seq in progressed:
            live = self.live.get(seq.request_id)
            if live is not None:
                verified = bool(live.scheduled_ns)  # a verification step, not the prefill
                if not verified:
                    live.scheduled_ns, live.first_token_ns = started, ended
                live.last_token_ns = ended
                self.respond(live, verified)
        return matched

    def respond(self, live: Live, verified: bool) -> None:
        seq = live.seq
        if verified:
            self.metrics.step_tokens(len(seq.output) - live.seen)
        live.seen = len(seq.output)
        pending = seq.output[live.sent:]
        if seq.error:
            self.log_error(f"request {live.client_id!r} failed alone: {seq.error}")
            self.fail(live, f"{ENGINE_FAILED} for this request; see the server log")
        elif seq.finished:
            self.finish(live)
            self.send(live, pending, final=live.group.end())
        elif live.stream:
            n = sendable(self.engine.tokenizer.decode, live.context, pending)
            if n:
                self.send(live, pending[:n], final=False)

    def send(self, live: Live, chunk: list[int], final: bool) -> None:
        if live.group.closed:  # a sibling failed: the client has its answer
            return
        seq = live.seq
        end = live.sent + len(chunk)
        response = Response(
            live.index, list(chunk), list(live.context), final, len(seq.output), seq.llm_steps, seq.draft_tokens,
            seq.accepted_draft_tokens, dict(seq.accepted_by_proposer), seq.log_probs[live.sent:end],
            float(sum(seq.log_probs[:end])),
            Timing(live.arrival_ns, live.scheduled_ns, live.first_token_ns, live.last_token_ns))
        live.group.closed = final
        live.sink.send(response)
        live.sent = end
        if chunk:
            live.context = list(chunk)

    def finish(self, live: Live, failed: bool = False) -> None:
        self.live.pop(live.seq.request_id, None)
        self.metrics.finished(live.seq, failed)

    def fail_all(self, incoming: list[Live], message: str) -> None:
        """End every request in the engine and those not yet admitted with an error."""
        for live in list(self.live.values()):
            self.engine.abort(live.seq)
            self.fail(live, message)
        for live in incoming:
            self.fail(live, message)
        self.engine.retire()

    def fail(self, live: Live, message: str) -> None:
        """End ``live`` with an error, and its siblings with it: one error ends their shared request."""
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
        live.sink.fail(message)
