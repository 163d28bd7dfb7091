"""Prometheus metrics of a decoding model, through the Python backend's custom-metrics API (``pb_utils``
is passed in); what ``loop.RequestLoop`` reports."""
from __future__ import annotations

from collections import Counter

from ..config import PROPOSERS
from ..sequence import Sequence

STEP_BUCKETS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 16]
TREE_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]


class ServingMetrics:
    """Counters per model (label ``model``): token and request counters grow when a request finishes
    (cancelled ones too), forward, prefill and time counters each step."""

    def __init__(self, pb_utils, model: str) -> None:
        self.families = []  # a family must outlive its metrics

        def family(name: str, doc: str, kind=pb_utils.MetricFamily.COUNTER):
            self.families.append(pb_utils.MetricFamily(name=name, description=doc, kind=kind))
            return self.families[-1]

        labels = {"model": model}
        counter = lambda name, doc: family(name, doc).Metric(labels=labels)  # noqa: E731
        self.output_tokens = counter("specinfer_output_tokens", "Generated tokens")
        self.llm_steps = counter("specinfer_llm_steps", "LLM forward passes per request (prefill included), summed")
        self.draft_tokens = counter("specinfer_draft_tokens", "Speculated tree tokens proposed (roots excluded)")
        accepted = family("specinfer_accepted_draft_tokens", "Speculated tree tokens accepted (label proposer: "
                          "those that proposer drafted; a token both drafted counts for both)")
        self.accepted = accepted.Metric(labels=labels)
        self.accepted_by = {p: accepted.Metric(labels={**labels, "proposer": p}) for p in PROPOSERS}
        self.requests = counter("specinfer_requests_finished", "Requests finished (completed or cancelled)")
        self.failed = counter("specinfer_requests_failed", "Requests that failed with an internal error")
        self.cancelled = counter("specinfer_requests_cancelled", "Requests cancelled by their client")
        self.rejected_requests = counter("specinfer_requests_rejected", "Requests rejected as invalid")
        self.llm_forwards = counter("specinfer_llm_forwards", "Batched LLM verification forwards")
        self.forward_requests = counter(
            "specinfer_llm_forward_requests", "Requests verified, summed over LLM forwards (mean batch = this / forwards)")
        self.prefill_forwards = counter("specinfer_prefill_forwards", "Batched LLM prefill forwards (one per step that admits requests)")
        self.step_seconds = counter("specinfer_step_seconds", "Wall seconds the engine spent in its steps")
        self.forward_seconds = counter(
            "specinfer_forward_seconds", "Of the step seconds, those inside model forwards (the LLM's and the drafters')")
        gauge = lambda name, doc: family(name, doc, pb_utils.MetricFamily.GAUGE).Metric(labels=labels)  # noqa: E731
        self.running = gauge("specinfer_running_requests", "Requests holding a KV-cache row")
        self.waiting = gauge("specinfer_waiting_requests", "Requests queued for a free row")
        self.tokens_per_step = family(
            "specinfer_tokens_per_step", "Tokens a request emits per verification step",
            pb_utils.MetricFamily.HISTOGRAM).Metric(labels=labels, buckets=STEP_BUCKETS)
        self.tree_size = family(
            "specinfer_tree_size", "Tree tokens (root included) the LLM verified per request and step; "
            "adaptive trees choose it every step, 1 is plain decoding",
            pb_utils.MetricFamily.HISTOGRAM).Metric(labels=labels, buckets=TREE_BUCKETS)

    def finished(self, seq: Sequence, failed: bool = False) -> None:
        if failed:  # an internal error or an unload: not counted as served
            self.failed.increment(1)
            return
        self.output_tokens.increment(len(seq.output))
        self.llm_steps.increment(seq.llm_steps)
        self.draft_tokens.increment(seq.draft_tokens)
        self.accepted.increment(seq.accepted_draft_tokens)
        for name, metric in self.accepted_by.items():
            metric.increment(seq.accepted_by_proposer[name])
        self.requests.increment(1)
        if seq.finish_reason == "cancelled":
            self.cancelled.increment(1)

    def rejected(self) -> None:
        self.rejected_requests.increment(1)

    def forwards(self, forwards: int, requests: int, prefills: int) -> None:
        if forwards:
            self.llm_forwards.increment(forwards)
            self.forward_requests.increment(requests)
        if prefills:
            self.prefill_forwards.increment(prefills)

    def busy(self, step_seconds: float, forward_seconds: float) -> None:
        self.step_seconds.increment(step_seconds)
        self.forward_seconds.increment(forward_seconds)

    def occupancy(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def step_tokens(self, n: int) -> None:
        self.tokens_per_step.observe(n)

    def tree_sizes(self, sizes: Counter) -> None:
        """The tree sizes one step verified (size -> requests)."""
        for size, count in sizes.items():
            for _ in range(count):
                self.tree_size.observe(size)
