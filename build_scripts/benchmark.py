"""The benchmark: SpecInfer against incremental decoding and Hugging Face, in one run, one machine.

On held-out prompts (engines/demo/prompts.json: chat questions on topics, coding tasks and
standard-library files no SSM training saw, formatted with the chat template where they are chat),
with the demo pair (SmolLM2-135M-Instruct, ssm-a, ssm-b):
- engine, greedy, batch 1: incremental; chain (depth 8); the paper's tree <1,1,3,1,1,1,1,1> with
  each SSM and both merged; a width sweep <1,1,w,1,1,1,1,1>, w = 1..5;
- engine, sampling at temperature 1: MSS with replacement, without replacement, naive sampling;
- engine, batch sizes 1, 4, 16, 32: adaptive trees (at most ADAPTIVE) against the static trees and
  incremental decoding, and the engine the served repository runs (--config, `engine_from_config`);
- the suffix proposer: its drafting cost at a 2,000-token context, and workloads (open prompts, code
  completion, grounded chat, multi-turn chat; engines/demo/workloads.json; answers of at most
  --workload-tokens, ending at the model's end of turn) at batch 1 against incremental, global index
  cold and warm (--workloads: only these; --suffix-cost: only the drafting cost, 3 rounds, seconds);
- --batches (only this): the served engine against incremental decoding at batch 1, 4, 16, 32,
  alternating in 3 rounds;
- --ceiling (only this): the drafters' ceiling, tokens per step if every node the suffix proposer
  and the draft head propose were verified, replayed on the LLM's greedy answers to the workloads;
- peer: transformers `generate` plain and assisted (the SSM as assistant), greedy, batch 1;
- through Triton: closed-loop clients against `specinfer` (adaptive) and `incremental` at
  concurrency 1 to 32.
  With --genai-perf also genai-perf (TTFT, inter-token latency, output token throughput; its own venv).
Writes results.json, results.md and PNG plots into --output.

  .venv/bin/python build_scripts/benchmark.py            # full
  .venv/bin/python build_scripts/benchmark.py --quick    # a few minutes
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from specinfer import EngineConfig, SamplingParams, SpecInferEngine, TreeConfig, engine_from_config  # noqa: E402
from specinfer.config import DTYPES, SuffixConfig, resolve_dtype  # noqa: E402
from specinfer.engine import EngineStats  # noqa: E402
from specinfer.proposers import DraftHead, HeadProposer, SuffixProposer  # noqa: E402
from specinfer.runner import chain_batch  # noqa: E402
from specinfer.tree import merge  # noqa: E402
from specinfer.verify import greedy_verify  # noqa: E402
from specinfer.serving.parameters import read_pbtxt_parameters  # noqa: E402
from specinfer.sampling import make_generator  # noqa: E402
from specinfer.sequence import Sequence  # noqa: E402
from specinfer.model import Transformer  # noqa: E402
from specinfer.tokenizer import TextTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAPER = (1, 1, 3, 1, 1, 1, 1, 1)
ADAPTIVE = (1, 1, 3, 1)  # the largest tree the adaptive rows may verify (the served repository allows (1, 1))


def held_out_prompts(models: Path, tokenizer: TextTokenizer) -> list[str]:
    """The held-out prompts as text, chat ones formatted by the chat template, kinds interleaved."""
    sets = json.loads((models / "prompts.json").read_text())
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in sets["chat"]]
    plain = sets["code"] + sets["text"]
    return [p for pair in zip(chat, plain) for p in pair] + chat[len(plain):] + plain[len(chat):]


class Bench:
    def __init__(self, models: Path, device: str, dtype: str, max_tokens: int) -> None:
        load = lambda n: Transformer.from_pretrained(models / n, device=device, dtype=DTYPES[dtype])  # noqa: E731
        self.llm, self.ssms = load("llm"), {"ssm-a": load("ssm-a"), "ssm-b": load("ssm-b")}
        folder = models / "head"
        self.head = DraftHead.from_pretrained(folder, self.llm.args.hidden_size) if folder.is_dir() else None
        self.tokenizer = TextTokenizer.from_checkpoint(models / "llm")
        self.models = models
        self.device, self.dtype = device, dtype
        self.texts = held_out_prompts(models, self.tokenizer)
        self.prompts = [self.tokenizer.encode(p) for p in self.texts]
        self.max_tokens = max_tokens
        self.rows: list[dict] = []
        self.reference: dict[int, list[list[int]]] = {}

    def engine(self, ssms: tuple[str, ...], tree: TreeConfig, batch: int) -> SpecInferEngine:
        config = EngineConfig(max_batch_size=batch, max_context=1024, device=self.device, dtype=self.dtype, tree=tree)
        return SpecInferEngine(self.llm, [self.ssms[s] for s in ssms], config, self.tokenizer,
                               self.head if "head" in tree.proposers else None)

    def served(self, config: Path, batch: int) -> SpecInferEngine:
        """The engine a decoding model's ``config`` builds, at this batch size, device and dtype, and
        the other rows' context (a capacity only)."""
        return engine_from_config(config, {"max_batch_size": batch, "device": self.device, "dtype": self.dtype,
                                           "max_context": 1024})

    def run(self, name: str, ssms: tuple[str, ...] = (), expansion: tuple[int, ...] = PAPER, batch: int = 1,
            temperature: float = 0.0, draft_sampling: str = "with_replacement", verifier: str = "mss",
            n_prompts: int | None = None, adaptive: bool = False, config: Path | None = None) -> dict:
        """``config``: a decoding model's config.pbtxt, whose engine runs instead (the settings above unused)."""
        n_prompts = n_prompts or len(self.prompts)
        prompts = (self.prompts * -(-n_prompts // len(self.prompts)))[:n_prompts]  # repeated where too few
        if config is None:
            tree = TreeConfig(expansion=expansion, draft_sampling=draft_sampling, verifier=verifier, adaptive=adaptive)
            engine, speculate = self.engine(ssms, tree, batch), bool(ssms)
        else:  # the served engine; the batch, device, dtype and context (capacity only) as for the other rows
            engine = self.served(config, batch)
            speculate, tree = True, engine.tree
            named = read_pbtxt_parameters(config.read_text()).get("ssms", "")
            ssms = tuple(Path(s).name for s in named.split(",") if s)
            expansion, verifier, adaptive = tree.expansion, tree.verifier, tree.adaptive
        params = SamplingParams(max_tokens=self.max_tokens, temperature=temperature, seed=0, ignore_eos=True)
        engine.generate(prompts[:1], replace(params, max_tokens=8), speculate=speculate)  # warm-up
        engine.stats = EngineStats()
        start = time.perf_counter()
        results = engine.generate(prompts, params, speculate=speculate)
        seconds = time.perf_counter() - start
        tokens = sum(len(r.token_ids) for r in results)
        steps = sum(r.llm_steps for r in results)
        st = engine.stats
        lengths = st.accepted_lengths
        verified = sum(lengths.values())
        depth_rate = [round(sum(c for n, c in lengths.items() if n >= d) / verified, 4) if verified else 0.0
                      for d in range(1, len(expansion) + 1)]
        ids = [r.token_ids for r in results]
        is_reference = temperature == 0 and not speculate
        if is_reference:
            self.reference[batch] = ids
        row = {
            "name": name, "ssms": list(ssms), "expansion": list(expansion), "batch": batch, "adaptive": adaptive,
            "temperature": temperature, "draft_sampling": draft_sampling, "verifier": verifier,
            "prompts": len(prompts), "output_tokens": tokens, "llm_steps": steps,
            "tokens_per_step": round(tokens / steps, 3),
            "acceptance_rate": round(sum(r.accepted_draft_tokens for r in results)
                                     / max(1, sum(r.draft_tokens for r in results)), 4),
            "acceptance_by_depth": depth_rate, "seconds": round(seconds, 3),
            "ms_per_token": round(1000 * seconds / tokens, 3),
            "overhead_ms_per_step": round(1000 * (st.step_seconds - st.forward_seconds)
                                          / max(1, st.verify_forwards + st.prefill_forwards), 3),
            "tree_sizes": {str(k): v for k, v in sorted(st.tree_sizes.items())},
            "identical_to_incremental": None if is_reference or temperature > 0
            else ids == self.reference[batch][: len(ids)],
        }
        self.rows.append(row)
        print(f"  {name:<34} tok/step {row['tokens_per_step']:5.2f}  accept {row['acceptance_rate']:6.1%}  "
              f"{row['ms_per_token']:7.2f} ms/tok  overhead {row['overhead_ms_per_step']:5.2f} ms/step", flush=True)
        return row


def suffix_cost(tokenizer: TextTokenizer, context: int = 2000, steps: int = 500) -> list[dict]:
    """Suffix drafting's host time per request and step at a ``context``-token context (real text:
    the standard library's argparse.py, each request at another offset), the index growing by one
    step's tokens each time; at batch 1 and 16 (one batch of trees per step)."""
    import argparse as source

    tokens = tokenizer.encode(Path(source.__file__).read_text())
    rows = []
    for batch in (1, 16):
        proposer = SuffixProposer(SuffixConfig())
        offsets = [i * 500 for i in range(batch)]
        seqs = [Sequence(i, tokens[o: o + context], SamplingParams(), frozenset(), make_generator(0))
                for i, o in enumerate(offsets)]
        proposer.propose(seqs)  # builds the indexes over the prompts (prefill's share, not a step's)
        sizes = []
        start = time.perf_counter()
        for i in range(steps):
            for seq, o in zip(seqs, offsets):
                seq.output.append(tokens[o + context + i])
            sizes.append(proposer.propose(seqs).sizes)
        ms = 1000 * (time.perf_counter() - start) / (steps * batch)
        nodes = float(torch.stack(sizes).float().mean()) - 1
        print(f"  suffix drafting at a {context}-token context, batch {batch:>2}: {ms:.3f} ms per request per step "
              f"({nodes:.1f} nodes per tree)", flush=True)
        rows.append({"context": context, "batch": batch, "ms_per_request_step": round(ms, 4), "nodes_per_tree": round(nodes, 2)})
    return rows


def workload_prompts(models: Path, tokenizer: TextTokenizer) -> dict[str, list[list[int]]]:
    """Open prompts, code completion, grounded chat requests, multi-turn chats; and a disjoint warm set."""
    sets = json.loads((models / "prompts.json").read_text())
    more = json.loads((models / "workloads.json").read_text())
    chat = lambda messages: tokenizer.encode(tokenizer.apply_chat_template(messages))  # noqa: E731
    warm = more["warm"]
    return {
        "open": [chat([{"role": "user", "content": q}]) for q in sets["chat"]] + [tokenizer.encode(t) for t in sets["text"]],
        "code": [tokenizer.encode(t) for t in sets["code"]],
        "grounded": [chat(m) for m in more["grounded"]],
        "multi_turn": [chat(m) for m in more["multi_turn"]],
        "warm": [chat([{"role": "user", "content": q}]) for q in warm["chat"]] + [chat(m) for m in warm["grounded"]]
        + [tokenizer.encode(t) for t in warm["text"]],
    }


def run_workloads(bench: "Bench", quick: bool, max_tokens: int) -> list[dict]:
    """Each workload at batch 1: every prompt decoded speculatively, then incrementally, timed apart
    (so both see the same machine moment); the global suffix index cold (none) or warm (filled from
    the disjoint warm set first); no prompt is decoded twice by an engine with a global index.
    Answers end at the model's end of turn or after ``max_tokens`` (what a served chat returns)."""
    sets = workload_prompts(bench.models, bench.tokenizer)
    params = SamplingParams(max_tokens=max_tokens)
    plain = bench.engine((), TreeConfig(expansion=(1,)), 1)
    configs = [("suffix,head adaptive, global cold", ("suffix", "head"), 0),
               ("suffix,head adaptive, global warm", ("suffix", "head"), 1 << 16),
               ("suffix,ssm adaptive, global cold", ("suffix", "ssm"), 0),
               ("head adaptive", ("head",), 0), ("suffix adaptive, global cold", ("suffix",), 0)]
    rows = []
    for name, proposers, global_tokens in configs[:2] if quick else configs:
        tree = TreeConfig(expansion=(1, 1), adaptive=True, proposers=proposers, suffix=SuffixConfig(global_tokens=global_tokens))
        engine = bench.engine(("ssm-a",), tree, 1)
        engine.generate(sets["warm"][:1], replace(params, max_tokens=8, ignore_eos=True))  # warm-up (never measured)
        if global_tokens:
            engine.generate(sets["warm"][1:], params)
        for workload in ("open", "code", "grounded", "multi_turn"):
            prompts = sets[workload][:3] if quick else sets[workload]
            spec_s = inc_s = 0.0
            results, reference = [], []
            engine.stats = EngineStats()
            for p in prompts:
                start = time.perf_counter()
                results += engine.generate([p], params)
                spec_s += time.perf_counter() - start
                start = time.perf_counter()
                reference += plain.generate([p], params, speculate=False)
                inc_s += time.perf_counter() - start
            tokens = sum(len(r.token_ids) for r in results)
            by = engine.stats.accepted_by_proposer
            row = {"name": f"workload {workload}: {name}", "workload": workload, "proposers": list(proposers),
                   "global_tokens": global_tokens, "batch": 1, "prompts": len(prompts), "output_tokens": tokens,
                   "tokens_per_step": round(tokens / sum(r.llm_steps for r in results), 3),
                   "accepted_suffix": by["suffix"], "accepted_ssm": by["ssm"], "accepted_head": by["head"],
                   "seconds": round(spec_s, 3), "incremental_seconds": round(inc_s, 3),
                   "speedup": round(inc_s / spec_s, 3),
                   "identical_to_incremental": [r.token_ids for r in results] == [r.token_ids for r in reference]}
            rows.append(row)
            print(f"  {row['name']:<52} tok/step {row['tokens_per_step']:5.2f}  speedup {row['speedup']:5.2f}x  "
                  f"accepted suffix {by['suffix']:4d} ssm {by['ssm']:4d} head {by['head']:4d}  "
                  f"identical {row['identical_to_incremental']}",
                  flush=True)
    return rows


def replay(llm: Transformer, head: DraftHead | None, proposers: tuple[str, ...], prompt: list[int],
           output: list[int], hidden: torch.Tensor, tree: TreeConfig = TreeConfig()) -> tuple[int, int]:
    """LLM steps (the prompt's forward included) and tree tokens verified if the LLM verified every
    node ``proposers`` offer while decoding ``output`` after ``prompt`` (what an engine without
    adaptive trees does); ``hidden [L, H]``: the LLM's final hidden states along ``prompt + output``,
    the head's state at each step being the one at the node before the root, as after a verification."""
    text, seq = prompt + output, Sequence(0, prompt, SamplingParams(), frozenset(), make_generator(0))
    seq.row = 0
    suffix = SuffixProposer(tree.suffix) if "suffix" in proposers else None
    drafter = (HeadProposer(head, llm.model.embed_tokens.weight, llm.lm_head.weight, 1, tree.head_expansion)
               if "head" in proposers else None)
    n, steps, sizes = len(prompt) + 1, 1, 0  # the prompt's forward gives the first token
    while n < len(text):
        seq.output = output[: n - len(prompt)]
        parts = [suffix.propose([seq])] if suffix else []
        if drafter:
            drafter.remember([0], hidden[n - 2][None])
            parts.append(drafter.propose([seq], torch.tensor([text[n - 1]])))
        batch = merge(parts)
        truth = torch.tensor(text[n:] + [-1] * (int(batch.depths.max()) + 1))  # the LLM's choice at each depth
        accepted = int(greedy_verify(batch, truth[batch.depths]).lengths[0])
        n += min(accepted, len(text) - n - 1) + 1
        steps, sizes = steps + 1, sizes + int(batch.sizes[0])
    return steps, sizes


def draft_ceiling(bench: "Bench", max_tokens: int) -> list[dict]:
    """The drafters' ceiling: tokens per LLM step if the LLM verified every node they propose (no
    pruning, forwards free), replayed on the LLM's own greedy answers to each workload (batch 1, own
    index only, the default suffix and head trees). Adaptive trees realise at most this, at the cost
    of verifying ``tree tokens`` per step; it separates what the drafters offer from what pruning and
    the machine's forward costs make of it."""
    sets = workload_prompts(bench.models, bench.tokenizer)
    plain = bench.engine((), TreeConfig(expansion=(1,)), 1)
    kinds = [("suffix",)] + ([("head",), ("suffix", "head")] if bench.head is not None else [])
    rows = []
    for workload in ("open", "code", "grounded", "multi_turn"):
        answers = []
        for p in sets[workload]:
            out = plain.generate([p], SamplingParams(max_tokens=max_tokens))[0].token_ids
            _, hidden = plain.llm.forward([0], [0], chain_batch([p + out]), hidden=True, priced=False, prompt=True)
            answers.append((p, out, hidden[0]))
        for kind in kinds:
            counted = [replay(bench.llm, bench.head, kind, p, out, hidden) for p, out, hidden in answers]
            steps, sizes = sum(c[0] for c in counted), sum(c[1] for c in counted)
            tokens = sum(len(out) for _, out, _ in answers)
            row = {"workload": workload, "proposers": list(kind), "output_tokens": tokens, "llm_steps": steps,
                   "tokens_per_step_ceiling": round(tokens / steps, 3),
                   "tree_tokens_per_step": round(sizes / (steps - len(answers)), 1)}
            rows.append(row)
            print(f"  ceiling {workload:<10} {'+'.join(kind):<12} tok/step {row['tokens_per_step_ceiling']:5.2f}  "
                  f"verifying {row['tree_tokens_per_step']:5.1f} tree tokens per step", flush=True)
    return rows


def hf_peer(models: Path, prompts: list[list[int]], max_tokens: int, reference: list[list[int]],
            dtype: str) -> list[dict]:
    """transformers' own generate, plain and assisted by ssm-a, greedy, batch 1, in the benchmark's dtype."""
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(models / "llm", dtype=DTYPES[dtype]).eval()
    assistant = AutoModelForCausalLM.from_pretrained(models / "ssm-a", dtype=DTYPES[dtype]).eval()
    rows = []
    for name, kwargs in (("hf generate", {}), ("hf assisted (ssm-a)", {"assistant_model": assistant})):
        gen = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0, **kwargs)
        with torch.no_grad():
            llm.generate(torch.tensor([prompts[0]]), **{**gen, "max_new_tokens": 8, "min_new_tokens": 8})
            start = time.perf_counter()
            outs = [llm.generate(torch.tensor([p]), **gen)[0, len(p):].tolist() for p in prompts]
            seconds = time.perf_counter() - start
        tokens = sum(len(o) for o in outs)
        rows.append({"name": name, "batch": 1, "output_tokens": tokens, "seconds": round(seconds, 3),
                     "ms_per_token": round(1000 * seconds / tokens, 3), "identical_to_incremental": outs == reference})
        print(f"  {name:<34} {rows[-1]['ms_per_token']:7.2f} ms/tok  identical {outs == reference}", flush=True)
    return rows


def host_time(bench: "Bench", config: Path, out: Path) -> None:
    """Host time per step outside model forwards (``EngineStats``: step wall time less forwards, per
    LLM forward) of speculative engines against incremental decoding at the same batch size."""
    rows = []
    for batch in (1, 16, 32):
        plain = bench.run(f"incremental batch {batch}", batch=batch, n_prompts=batch)
        for row in (bench.run(f"adaptive <{','.join(map(str, ADAPTIVE))}> (a) batch {batch}", ("ssm-a",), ADAPTIVE,
                              batch=batch, n_prompts=batch, adaptive=True),
                    bench.run(f"served ({config.parent.name}) batch {batch}", batch=batch, n_prompts=batch, config=config)):
            rows.append({"batch": batch, "name": row["name"], "incremental_ms": plain["overhead_ms_per_step"],
                         "speculative_ms": row["overhead_ms_per_step"],
                         "extra_ms": round(row["overhead_ms_per_step"] - plain["overhead_ms_per_step"], 3)})
    print("[bench] host ms per step outside forwards: speculative - incremental")
    for r in rows:
        print(f"  {r['name']:<40} {r['speculative_ms']:6.2f} - {r['incremental_ms']:5.2f} = {r['extra_ms']:+6.2f} ms")
    (out / "host_time.json").write_text(json.dumps(rows, indent=2))


def batch_pairs(bench: "Bench", config: Path, batches: tuple[int, ...], rounds: int) -> list[dict]:
    """The served engine against incremental decoding (an engine without SSMs) at each batch size,
    the same held-out prompts (a closed batch: all admitted at once, decoded to the end), the two
    alternating ``rounds`` times so that the machine's drifting speed hits both alike; the median
    of the per-round ratios."""
    rows = []
    params = SamplingParams(max_tokens=bench.max_tokens, seed=0, ignore_eos=True)
    for batch in batches:
        prompts = (bench.prompts * -(-batch // len(bench.prompts)))[:batch]
        plain = bench.engine((), TreeConfig(expansion=(1,)), batch)
        served = bench.served(config, batch)
        for engine, speculate in ((plain, False), (served, True)):
            engine.generate(prompts[:1], replace(params, max_tokens=8), speculate=speculate)  # warm-up
        ratios, steps, same = [], 0, True
        for _ in range(rounds):
            start = time.perf_counter()
            reference = plain.generate(prompts, params, speculate=False)
            inc_s = time.perf_counter() - start
            start = time.perf_counter()
            results = served.generate(prompts, params)
            spec_s = time.perf_counter() - start
            ratios.append(inc_s / spec_s)
            steps += sum(r.llm_steps for r in results)
            same &= [r.token_ids for r in results] == [r.token_ids for r in reference]
        tokens = rounds * sum(len(r.token_ids) for r in results)
        row = {"batch": batch, "rounds": rounds, "ratios": [round(r, 3) for r in ratios],
               "speedup_median": round(statistics.median(ratios), 3), "tokens_per_step": round(tokens / steps, 3),
               "identical_to_incremental": same}
        rows.append(row)
        print(f"  served vs incremental, batch {batch:>2}: speedup {row['speedup_median']:.3f}x (rounds {row['ratios']})  "
              f"tok/step {row['tokens_per_step']:.2f}  identical {same}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer prompts, tokens and configurations")
    ap.add_argument("--models", default=str(ROOT / "engines" / "demo"))
    ap.add_argument("--output", default=str(ROOT / "benchmarks"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="auto (bfloat16 where the CPU computes it), float32, bfloat16")
    ap.add_argument("--config", default=str(ROOT / "model_repository" / "specinfer_llm" / "config.pbtxt"),
                    help="a decoding model's config.pbtxt: its engine (engine_from_config) is measured at every batch size")
    ap.add_argument("--host-time", action="store_true",
                    help="only the host time per step outside model forwards: incremental, adaptive (a) and the served "
                         "engine at batch 1, 16 and 32 (the step's regression figure)")
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton part")
    ap.add_argument("--load", action="store_true",
                    help="only what adaptive trees are compared with: incremental, ssm-a's static trees, batch sizes, peers")
    ap.add_argument("--genai-perf", action="store_true",
                    help="also run bench_genai_perf.py (creates .venv-genai-perf with genai-perf 0.0.16 once)")
    ap.add_argument("--workloads", action="store_true",
                    help="only the suffix proposer's figures: its drafting cost and the workloads (open, code, grounded, "
                         "multi-turn) against incremental, global index cold and warm")
    ap.add_argument("--workload-tokens", type=int, default=128,
                    help="longest answer in the workloads (they end at the model's end of turn otherwise)")
    ap.add_argument("--batches", action="store_true",
                    help="only the served engine against incremental decoding at batch 1, 4, 16 and 32, "
                         "alternating in 3 rounds (the ratio's median)")
    ap.add_argument("--ceiling", action="store_true",
                    help="only the drafters' ceiling: tokens per step if every proposed node were verified, replayed on the "
                         "LLM's greedy answers to the workloads (suffix, head, both)")
    ap.add_argument("--suffix-cost", action="store_true",
                    help="only suffix drafting's host time per request and step at a 2,000-token context, 3 rounds")
    args = ap.parse_args()
    args.dtype = resolve_dtype(args.dtype, args.device)
    models, out = Path(args.models), Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if args.suffix_cost:
        tokenizer = TextTokenizer.from_checkpoint(models / "llm")
        rounds = [suffix_cost(tokenizer) for _ in range(3)]
        for i, batch in enumerate((1, 16)):
            ms = statistics.median(r[i]["ms_per_request_step"] for r in rounds)
            print(f"[bench] suffix drafting, batch {batch:>2}: median {ms:.3f} ms per request per step over 3 rounds")
        (out / "suffix_cost.json").write_text(json.dumps(rounds, indent=2))
        return
    n, max_tokens = (4, 48) if args.quick else (6, 48)
    started = time.monotonic()
    bench = Bench(models, args.device, args.dtype, max_tokens)
    print(f"[bench] {platform.machine()} cpu threads={torch.get_num_threads()} device={args.device} dtype={args.dtype}; "
          f"{n} held-out prompts x {max_tokens} tokens", flush=True)
    if args.batches:
        rows = batch_pairs(bench, Path(args.config), (1, 4, 16, 32), rounds=3)
        (out / "batches.json").write_text(json.dumps(rows, indent=2))
        print(f"[bench] done in {time.monotonic() - started:.0f} s: {out}/batches.json")
        return
    if args.ceiling:
        rows = draft_ceiling(bench, args.workload_tokens)
        (out / "ceiling.json").write_text(json.dumps(rows, indent=2))
        print(f"[bench] done in {time.monotonic() - started:.0f} s: {out}/ceiling.json")
        return
    if args.host_time:
        host_time(bench, Path(args.config), out)
        print(f"[bench] done in {time.monotonic() - started:.0f} s: {out}/host_time.json")
        return
    print("[bench] suffix proposer: drafting cost; workloads at batch 1, speculative then incremental per prompt")
    cost = suffix_cost(bench.tokenizer)
    workloads = run_workloads(bench, args.quick, args.workload_tokens)
    if args.workloads:
        (out / "workloads.json").write_text(json.dumps({"suffix_cost": cost, "workloads": workloads}, indent=2))
        print(f"[bench] done in {time.monotonic() - started:.0f} s: {out}/workloads.json")
        return
    print("[bench] engine, greedy, batch 1")
    bench.run("incremental", n_prompts=n)
    for ssms in (("ssm-a",),) if args.load else (("ssm-a",), ("ssm-b",), ("ssm-a", "ssm-b")):
        label = "+".join(s[-1] for s in ssms)
        bench.run(f"chain depth 2 ({label})", ssms, (1,) * 2, n_prompts=n)
        bench.run(f"chain depth 8 ({label})", ssms, (1,) * 8, n_prompts=n)
        bench.run(f"paper tree ({label})", ssms, PAPER, n_prompts=n)
    for w in () if args.load else (1, 2, 3, 5) if not args.quick else (1, 3):
        bench.run(f"width {w} <1,1,{w},1,1,1,1,1> (a+b)", ("ssm-a", "ssm-b"), (1, 1, w, 1, 1, 1, 1, 1), n_prompts=n)
    print("[bench] engine, temperature 1, batch 1, paper tree (a+b)")
    for label, sampling, verifier in (("MSS with replacement", "with_replacement", "mss"),
                                      ("MSS without replacement", "without_replacement", "mss"),
                                      ("naive sampling", "with_replacement", "naive")):
        for w in () if args.load else (1, 3) if not args.quick else (3,):
            bench.run(f"{label} w{w}", ("ssm-a", "ssm-b"), (1, 1, w, 1, 1, 1, 1, 1), temperature=1.0,
                      draft_sampling=sampling, verifier=verifier, n_prompts=n)
    print("[bench] engine, greedy, batch sizes: adaptive trees against static ones and incremental")
    for batch in (1, 4, 16, 32):
        if batch > 1:
            bench.run(f"incremental batch {batch}", batch=batch, n_prompts=batch)
            bench.run(f"chain depth 2 (a) batch {batch}", ("ssm-a",), (1, 1), batch=batch, n_prompts=batch)
            if not args.quick:
                bench.run(f"paper tree (a+b) batch {batch}", ("ssm-a", "ssm-b"), PAPER, batch=batch, n_prompts=batch)
        bench.run(f"adaptive <{','.join(map(str, ADAPTIVE))}> (a) batch {batch}", ("ssm-a",), ADAPTIVE, batch=batch,
                  n_prompts=batch if batch > 1 else n, adaptive=True)
        bench.run(f"served ({Path(args.config).parent.name}) batch {batch}", batch=batch,
                  n_prompts=batch if batch > 1 else n, config=Path(args.config))
    print("[bench] peer: Hugging Face transformers, greedy, batch 1")
    peer = hf_peer(models, bench.prompts[:n], max_tokens, bench.reference[1][:n], args.dtype)
    triton = []
    if not args.no_triton:
        from bench_triton import run_triton

        print("[bench] through Triton (closed-loop HTTP clients, the served repository: adaptive specinfer)")
        triton = run_triton(ROOT / "model_repository", bench.texts, max_tokens,
                            (1, 4, 16, 32) if args.quick else (1, 2, 4, 8, 16, 32), rounds=1 if args.quick else 2)
    genai_perf = []
    if args.genai_perf:
        print("[bench] through Triton (genai-perf, kserve + tensorrtllm, streaming)")
        figures = out / "genai_perf.json"
        subprocess.run([sys.executable, str(ROOT / "build_scripts" / "bench_genai_perf.py"), "--install",
                        "--concurrency", "1,4" if args.quick else "1,2,4,8,16", "--output-tokens", str(max_tokens),
                        "--json", str(figures)], check=True)
        genai_perf = json.loads(figures.read_text())
    report = {"machine": {"arch": platform.machine(), "threads": torch.get_num_threads(), "device": args.device,
                          "dtype": args.dtype, "torch": torch.__version__},
              "quick": args.quick, "engine": bench.rows, "suffix_cost": cost, "workloads": workloads, "hf": peer, "triton": triton, "genai_perf": genai_perf,
              "models": json.loads((models / "models.json").read_text()) if (models / "models.json").is_file() else None,
              "seconds": round(time.monotonic() - started, 1)}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    from bench_report import write_markdown, write_plots

    write_markdown(report, out / "results.md")
    write_plots(report, out)
    print(f"[bench] done in {report['seconds']:.0f} s: {out}/results.json, results.md, *.png")


if __name__ == "__main__":
    main()
