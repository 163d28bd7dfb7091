"""The request loop without Triton (serving/loop.py): streaming, cancellation, groups, drain, failures."""
from __future__ import annotations

import time
from collections import Counter

import pytest

from conftest import prompts
from specinfer import EngineConfig, SamplingParams, SpecInferEngine, TreeConfig
from specinfer.model import Transformer
from specinfer.serving.errors import ENGINE_FAILED, SHUTTING_DOWN, UNLOADING
from specinfer.serving.loop import NoMetrics, Request, RequestFailed, RequestLoop, Responses

LONG = 200  # max_tokens of a request that runs until something stops it


class Bytes:
    """A tokenizer whose high ids are UTF-8 lead and continuation bytes, so that streams must hold
    back partial characters."""

    @staticmethod
    def decode(ids: list[int]) -> str:
        return bytes(0x20 + t if t < 80 else (0xC3 if t % 2 else 0xA9) for t in ids).decode("utf-8", "replace")


class Recorded(NoMetrics):
    def __init__(self) -> None:
        self.ended: list[tuple[int, str | None, bool]] = []  # (request id, finish reason, failed)
        self.sizes: Counter = Counter()
        self.forward_requests = self.prefills = 0
        self.step_seconds = self.forward_seconds = 0.0

    def finished(self, seq, failed: bool = False) -> None:
        self.ended.append((seq.request_id, seq.finish_reason, failed))

    def forwards(self, forwards: int, requests: int, prefills: int) -> None:
        self.forward_requests += requests
        self.prefills += prefills

    def busy(self, step_seconds: float, forward_seconds: float) -> None:
        self.step_seconds += step_seconds
        self.forward_seconds += forward_seconds

    def tree_sizes(self, sizes: Counter) -> None:
        self.sizes += sizes


@pytest.fixture()
def engine(models):
    llm, ssm = Transformer.from_pretrained(models["llm"]), Transformer.from_pretrained(models["close"])
    config = EngineConfig(max_batch_size=4, max_context=256, tree=TreeConfig(expansion=(1, 2, 1), verifier="gumbel"))
    return SpecInferEngine(llm, [ssm], config, Bytes())


@pytest.fixture()
def metrics():
    return Recorded()


@pytest.fixture()
def loop(engine, metrics):
    loop = RequestLoop(engine, metrics=metrics)
    yield loop
    loop.close()


def submit(loop: RequestLoop, prompt: list[int], **kwargs) -> Responses:
    params = kwargs.pop("params", SamplingParams(max_tokens=12, ignore_eos=True))
    sink = Responses(timeout=120)
    loop.submit(Request(prompt, params, **kwargs), sink)
    return sink


def idle(engine: SpecInferEngine) -> bool:
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if engine.occupancy() == (0, 0):
            return True
        time.sleep(0.01)
    return False


def test_a_streamed_request_gets_the_tokens_of_generate(engine, loop, metrics):
    batch = prompts(3, seed=70)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    before = engine.stats_snapshot()  # where the loop's accounting starts (its fixture made it)
    want = [r.token_ids for r in engine.generate(batch, params)]
    sinks = [submit(loop, p, params=params, stream=True) for p in batch]
    for sink, prompt, tokens in zip(sinks, batch, want):
        responses = list(sink)
        assert [t for r in responses for t in r.tokens] == tokens
        assert len(responses) > 1 and [r.final for r in responses] == [False] * (len(responses) - 1) + [True]
        assert responses[0].context == prompt and all(b.context == a.tokens for a, b in zip(responses, responses[1:]))
        last = responses[-1]
        assert last.output_tokens == len(tokens) and last.llm_steps >= 1 + (len(tokens) - 1) // 4
        timing = last.timing
        assert 0 < timing.arrival_ns <= timing.scheduled_ns < timing.first_token_ns <= timing.last_token_ns
    assert idle(engine)
    assert sorted(reason for _, reason, _ in metrics.ended) == ["length"] * 3
    assert sum(metrics.sizes.values()) == metrics.forward_requests > 0  # every verified tree counted once
    stats = engine.stats_snapshot()  # the loop reported every step's seconds, once
    assert (metrics.step_seconds, metrics.forward_seconds) == pytest.approx(
        (stats.step_seconds - before.step_seconds, stats.forward_seconds - before.forward_seconds))
    assert 0 < metrics.forward_seconds < metrics.step_seconds
    assert 2 <= metrics.prefills == stats.prefill_forwards - before.prefill_forwards <= 4  # generate's 1, the loop's 1-3


def test_a_request_not_streamed_gets_one_response(engine, loop):
    prompt = prompts(1, seed=71)[0]
    want = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    (response,) = list(submit(loop, prompt))
    assert response.tokens == want.token_ids and response.final and response.context == prompt
    assert (response.draft_tokens, response.accepted_draft_tokens) == (want.draft_tokens, want.accepted_draft_tokens)


def test_cancelling_frees_the_row_and_the_others_go_on(engine, loop, metrics):
    batch = prompts(2, seed=72)
    want = engine.generate([batch[1]], SamplingParams(max_tokens=16, ignore_eos=True))[0].token_ids
    doomed = submit(loop, batch[0], params=SamplingParams(max_tokens=LONG, ignore_eos=True), stream=True)
    other = submit(loop, batch[1], params=SamplingParams(max_tokens=16, ignore_eos=True))
    got = []
    for response in doomed:
        got += response.tokens
        doomed.cancel()
    assert 0 < len(got) < LONG  # ended by the cancellation, with an empty final response
    assert [t for r in other for t in r.tokens] == want
    assert idle(engine) and not engine.has_work()
    assert sorted(reason for _, reason, _ in metrics.ended) == ["cancelled", "length"]


def test_a_stop_may_arrive_before_its_request(engine, loop):
    loop.stop("client-7")
    assert list(submit(loop, [3, 4, 5], params=SamplingParams(max_tokens=LONG, ignore_eos=True),
                       client_id="client-7")) == []
    assert idle(engine)
    (response,) = list(submit(loop, [3, 4, 5], client_id="client-7"))  # the stop was used up
    assert len(response.tokens) == 12


def test_a_failing_sequence_ends_its_group_alone(engine, metrics, monkeypatch):
    """One sequence of a num_return_sequences group fails inside a step: the group gets one error and
    nothing after it, its other sequences leave the engine, and a request beside it is untouched."""
    batch = prompts(2, seed=73)
    params = SamplingParams(max_tokens=16, ignore_eos=True, seed=10)  # the group's sequences: seeds 10, 11, 12
    want = engine.generate([batch[1]], SamplingParams(max_tokens=16, ignore_eos=True))[0].token_ids
    step = engine.step

    def failing_step(speculate: bool = True):
        progressed = step(speculate)
        for seq in progressed:
            if seq.seed == 11 and seq.llm_steps == 2:  # after its first verification
                seq.fail(FloatingPointError("probabilities are not finite"))
        return progressed

    monkeypatch.setattr(engine, "step", failing_step)
    loop = RequestLoop(engine, metrics=metrics)
    try:
        group = submit(loop, batch[0], params=params, n=3, stream=True)
        other = submit(loop, batch[1], params=SamplingParams(max_tokens=16, ignore_eos=True))
        with pytest.raises(RequestFailed, match=f"^{ENGINE_FAILED} for this request"):
            list(group)
        assert [t for r in other for t in r.tokens] == want
        assert idle(engine)
        assert group.queue.empty()  # nothing after the error
    finally:
        loop.close()
    reasons = Counter((reason, failed) for _, reason, failed in metrics.ended)
    assert reasons == Counter({("error", True): 1, ("cancelled", False): 2, ("length", False): 1})


def test_sequences_of_a_group_draw_from_consecutive_seeds(engine, loop):
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=5, ignore_eos=True)
    prompt = prompts(1, seed=74)[0]
    by_index = {}
    for r in submit(loop, prompt, params=params, n=3):
        by_index[r.index] = r.tokens
    assert sorted(by_index) == [0, 1, 2]
    assert idle(engine)
    assert len({tuple(tokens) for tokens in by_index.values()}) > 1
    for i in range(3):  # the Gumbel verifier: a seed gives the same tokens at any batch
        (alone,) = list(submit(loop, prompt, params=SamplingParams(max_tokens=10, temperature=1.0, seed=5 + i,
                                                                   ignore_eos=True)))
        assert alone.index == 0 and alone.tokens == by_index[i]
    with pytest.raises(ValueError, match="num_return_sequences must be in \\[1, 4\\] \\(max_batch_size\\), got 5"):
        loop.submit(Request(prompt, params, n=5), Responses())


def test_drain_fails_what_is_in_flight_and_refuses_more(engine, loop):
    sinks = [submit(loop, p, params=SamplingParams(max_tokens=LONG, ignore_eos=True), stream=True)
             for p in prompts(2, seed=75)]
    first = next(iter(sinks[0]))
    assert first.tokens
    loop.drain()
    for sink in sinks:
        with pytest.raises(RequestFailed, match=SHUTTING_DOWN):
            list(sink)
    assert idle(engine) and not engine.has_work()
    with pytest.raises(RequestFailed, match=SHUTTING_DOWN):
        list(submit(loop, [3, 4]))


def test_close_fails_what_is_left(engine):
    loop = RequestLoop(engine)
    sink = submit(loop, [3, 4, 5], params=SamplingParams(max_tokens=LONG, ignore_eos=True), stream=True)
    next(iter(sink))
    loop.close()
    with pytest.raises(RequestFailed, match=UNLOADING):
        list(sink)


def test_an_engine_failure_fails_the_requests_in_flight_and_the_loop_goes_on(engine, monkeypatch):
    step, calls = engine.step, []

    def broken_once(speculate: bool = True):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a bug in a batched forward")
        return step(speculate)

    monkeypatch.setattr(engine, "step", broken_once)
    errors: list[str] = []
    loop = RequestLoop(engine, log_error=errors.append)
    try:
        with pytest.raises(RequestFailed, match=f"^{ENGINE_FAILED}; see the server log"):
            list(submit(loop, [3, 4, 5]))
        assert idle(engine) and "a bug in a batched forward" in errors[0]
        (response,) = list(submit(loop, [3, 4, 5]))
        assert len(response.tokens) == 12
    finally:
        loop.close()


def test_run_in_thread_returns_or_raises_from_another_thread():
    import threading

    from specinfer.serving.loop import run_in_thread

    assert run_in_thread(lambda: threading.current_thread() is threading.main_thread()) is False
    with pytest.raises(ValueError, match="bad"):
        run_in_thread(lambda: (_ for _ in ()).throw(ValueError("bad")))
