"""Speculative against incremental decoding on the same engine, prompts and settings, in one run."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from .config import SamplingParams
from .engine import GenerationResult, SpecInferEngine


@dataclass
class RunStats:
    mode: str
    requests: int
    output_tokens: int
    llm_steps: int
    draft_tokens: int
    accepted_draft_tokens: int
    seconds: float

    @property
    def tokens_per_step(self) -> float:
        return self.output_tokens / self.llm_steps

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def ms_per_token(self) -> float:
        return 1000 * self.seconds / self.output_tokens

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_step": self.tokens_per_step,
                "acceptance_rate": self.acceptance_rate, "ms_per_token": self.ms_per_token}


def timed_run(engine: SpecInferEngine, prompts: list, params: SamplingParams, speculate: bool
              ) -> tuple[RunStats, list[GenerationResult]]:
    start = time.perf_counter()
    results = engine.generate(prompts, params, speculate=speculate)
    seconds = time.perf_counter() - start
    stats = RunStats(
        "speculative" if speculate else "incremental", len(results), sum(len(r.token_ids) for r in results),
        sum(r.llm_steps for r in results), sum(r.draft_tokens for r in results),
        sum(r.accepted_draft_tokens for r in results), seconds,
    )
    return stats, results


def compare(engine: SpecInferEngine, prompts: list, params: SamplingParams) -> tuple[RunStats, RunStats, bool]:
    """Warm up, then time incremental and speculative decoding; the flag says outputs are equal."""
    engine.generate(prompts[:1], SamplingParams(max_tokens=4, ignore_eos=True), speculate=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=4, ignore_eos=True), speculate=False)
    inc, inc_results = timed_run(engine, prompts, params, speculate=False)
    spec, spec_results = timed_run(engine, prompts, params, speculate=True)
    same = [r.token_ids for r in inc_results] == [r.token_ids for r in spec_results]
    return inc, spec, same


def report(inc: RunStats, spec: RunStats, same: bool) -> str:
    lines = [f"{'mode':<12} {'tokens':>7} {'LLM steps':>9} {'tok/step':>8} {'accept':>7} {'ms/token':>9} {'wall s':>7}"]
    for s in (inc, spec):
        lines.append(f"{s.mode:<12} {s.output_tokens:>7} {s.llm_steps:>9} {s.tokens_per_step:>8.2f} "
                     f"{s.acceptance_rate:>7.1%} {s.ms_per_token:>9.2f} {s.seconds:>7.2f}")
    lines.append(f"speedup over incremental: {inc.seconds / spec.seconds:.2f}x   identical output: {same}")
    return "\n".join(lines)
