"""SpecInferEngine: speculate with the SSMs, verify every tree in one LLM forward, commit.

One iteration (``step``) is a short sequence of named steps over all running requests:
admit + prefill newcomers, ``speculate`` (SSM trees, merged), ``score`` (one LLM forward),
``verify`` (per request), ``commit`` (tokens out, accepted K/V moved, finished requests leave).
With ``speculate=False`` every tree is a lone root: plain incremental decoding, same batching.
"""
from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .adaptive import (AcceptanceModel, RateCorrection, best_nodes, choose_depth, choose_verify_size,
                       path_probability)
from .config import DTYPES, EngineConfig, SamplingParams, TreeConfig
from .cost_model import ForwardCosts, calibration_sizes
from .model.cuda_graphs import GraphedModel
from .draft import draft_trees, ssm_accepted
from .log_probs import record
from .logits_processors import process_batch
from .model import Transformer
from .proposers import SuffixProposer
from .runner import ModelRunner, NodeBatch, chain_batch
from .runtimes import load_model
from .sampling import gumbel_choice, make_generator, sample, target_probs, target_scores
from .scheduler import Scheduler
from .sequence import Sequence
from .tokenizer import TextTokenizer
from .tree import Tree, TreeBatch, merge_trees, pad_trees, prune, root_only
from .verify import Verdict, greedy_verify, mss_verify, naive_verify

if TYPE_CHECKING:
    from .parallel.leader import Workers

CALIBRATION_TOKENS = 256  # adaptive trees measure forwards up to this many tokens at start-up
MAX_PROBE_WAIT = 64  # steps without drafting before the SSMs are tried again, at most
NO_FINITE_SCORE = "no token has a finite score under the sampling settings and logits changes"


@dataclass
class EngineStats:
    """Running totals of the engine's LLM forwards, for serving metrics."""

    prefill_forwards: int = 0
    verify_forwards: int = 0
    verify_requests: int = 0  # requests summed over verification forwards
    accepted_lengths: Counter = field(default_factory=Counter)  # accepted draft path length -> count
    tree_sizes: Counter = field(default_factory=Counter)  # tree tokens verified per request and step -> count
    accepted_by_proposer: Counter = field(default_factory=Counter)  # proposer -> accepted draft tokens it proposed
    step_seconds: float = 0.0  # wall time in step()
    forward_seconds: float = 0.0  # of which inside model forwards (LLM and SSMs)


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str | None
    llm_steps: int
    draft_tokens: int
    accepted_draft_tokens: int
    finish_reason: str
    log_probs: list[float] = field(default_factory=list)  # per token, where SamplingParams.log_probs asks
    seed: int = 0  # the request's seed, or the one drawn for it: SamplingParams(seed=...) reproduces the output

    @property
    def tokens_per_step(self) -> float:
        return len(self.token_ids) / self.llm_steps

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else 0.0


class SpecInferEngine:
    def __init__(
        self, llm: Transformer, ssms: Seq[Transformer] = (), config: EngineConfig = EngineConfig(),
        tokenizer: TextTokenizer | None = None,
    ) -> None:
        vocab = llm.args.vocab_size
        for i, ssm in enumerate(ssms):
            if ssm.args.vocab_size != vocab:
                raise ValueError(
                    f"SSM {i} has a vocabulary of {ssm.args.vocab_size} tokens, the LLM {vocab}: they must match"
                )
        tree = config.tree
        if "ssm" not in tree.proposers:
            ssms = []  # loaded but not asked for
        tree.check_size(max(1, len(ssms)))
        if max(tree.expansion) > vocab:
            raise ValueError(f"expansion width {max(tree.expansion)} exceeds the vocabulary ({vocab})")
        self.config, self.tree, self.tokenizer = config, tree, tokenizer
        self.vocab = vocab
        self.max_context = config.max_context or llm.args.max_position_embeddings
        slots = self.max_context + tree.max_tree_tokens + 1
        for model in [llm, *ssms]:
            if isinstance(model, Transformer):
                model.batch_invariant(config.batch_invariant)
        if config.cuda_graphs and config.attention == "triton":  # graphs need the kernel's device-side lengths
            llm = GraphedModel(llm) if isinstance(llm, Transformer) else llm  # not a tensor-parallel proxy
            ssms = [GraphedModel(m) if isinstance(m, Transformer) else m for m in ssms]
        invariant = config.batch_invariant
        self.llm = ModelRunner(llm, config.max_batch_size, slots, config.attention, invariant)
        self.ssms = [ModelRunner(m, config.max_batch_size, slots, getattr(m, "attention", config.attention), invariant)
                     for m in ssms]
        self.eos_ids = frozenset(llm.args.eos_token_ids)
        self.scheduler = Scheduler(config.max_batch_size)
        self.stats = EngineStats()
        self._ids = count()
        self.acceptance = AcceptanceModel()  # of SSM nodes
        self.suffix = SuffixProposer(tree.suffix) if "suffix" in tree.proposers else None
        self.suffix_acceptance = AcceptanceModel()
        self.columns = ["ssm"] * len(self.ssms) + (["suffix"] if self.suffix else [])  # Tree.proposals' columns
        self.rates = RateCorrection()
        self.predicted_rate = 0.0  # adaptive trees: tokens per second the current step's choice expects
        self.depth_gains = [0.5 ** (j + 1) for j in range(tree.depth)]  # prior until drafts are seen
        self.probe_wait, self.since_draft = 2, 0
        if tree.adaptive and (self.ssms or self.suffix):
            self.calibrate()

    @classmethod
    def from_pretrained(
        cls, llm: str | Path, ssms: Seq[str | Path] = (), tree: TreeConfig = TreeConfig(),
        device: str = "cpu", dtype: str = "float32", max_batch_size: int = 16, max_context: int | None = None,
        attention: str | None = None, tensor_parallel_size: int = 1, workers: "Workers | None" = None,
        ssm_engine: str = "torch", cuda_graphs: bool | None = None, batch_invariant: bool = True, offload: str = "none",
    ) -> "SpecInferEngine":
        """``tensor_parallel_size > 1`` shards the LLM over that many processes (``parallel/``), spawned
        here unless ``workers`` says otherwise (``parallel.MpiWorkers`` under mpiexec); ``close()`` stops them."""
        config = EngineConfig(max_batch_size=max_batch_size, max_context=max_context, device=device, dtype=dtype, tree=tree,
                              attention=attention, tensor_parallel_size=tensor_parallel_size, ssm_engine=ssm_engine,
                              cuda_graphs=cuda_graphs, batch_invariant=batch_invariant, offload=offload)
        dtype = config.dtype  # "auto" resolved
        if tensor_parallel_size == 1:
            target = Transformer.from_pretrained(llm, device=device, dtype=DTYPES[dtype], offload=offload)
        else:
            from .parallel import TensorParallelLLM

            target = TensorParallelLLM(llm, tensor_parallel_size, device, dtype, workers)
        try:
            context = max_context or target.args.max_position_embeddings
            slots = context + tree.max_tree_tokens + 1
            drafts = [load_model(ssm_engine, s, device, DTYPES[dtype], max_batch_size, slots, context, tree) for s in ssms]
            return cls(target, drafts, config, TextTokenizer.from_checkpoint(llm))
        except BaseException:
            close = getattr(target, "close", None)
            if close is not None:
                close()
            raise

    def close(self) -> None:
        """Stop the LLM's tensor-parallel workers, if it has any; the engine is unusable afterwards."""
        close = getattr(self.llm.model, "close", None)  # a TensorParallelLLM's; a Transformer has none
        if close is not None:
            close()

    def __enter__(self) -> "SpecInferEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- requests -------------------------------------------------------------------------
    def encode(self, prompt: str | Seq[int]) -> list[int]:
        """Token ids of a prompt, validated against the LLM's vocabulary."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt is a string but the LLM folder has no tokenizer.json: pass token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        for tok in ids:
            if not isinstance(tok, int) or not 0 <= tok < self.vocab:
                raise ValueError(f"prompt token id {tok!r} is outside the vocabulary [0, {self.vocab})")
        return ids

    def new_sequence(self, prompt: str | Seq[int], params: SamplingParams) -> Sequence:
        ids = self.encode(prompt)
        if len(ids) + params.max_tokens > self.max_context:
            raise ValueError(
                f"prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the context "
                f"of {self.max_context} tokens"
            )
        stop = set(params.stop_token_ids) | ({params.end_id} if params.end_id is not None else set())
        if not params.ignore_eos:
            stop |= self.eos_ids
        seed = secrets.randbits(64) if params.seed is None else params.seed
        return Sequence(next(self._ids), ids, params, frozenset(stop), make_generator(seed), len(self.ssms), seed=seed)

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def abort(self, seq: Sequence) -> None:
        """Stop ``seq`` (a cancelled request); its cache row is free after the next ``step``."""
        self.scheduler.abort(seq)

    def generate(
        self, prompts: Seq[str | Seq[int]], sampling: SamplingParams | Seq[SamplingParams] = SamplingParams(),
        speculate: bool = True,
    ) -> list[GenerationResult]:
        """Run ``prompts`` to completion, batched and continuously scheduled; results in order."""
        params = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling parameter sets")
        seqs = [self.new_sequence(p, sp) for p, sp in zip(prompts, params)]  # all validated first
        for seq in seqs:
            self.add(seq)
        try:
            while not all(s.finished for s in seqs):
                self.step(speculate)
        except BaseException:  # the engine stays usable: none of these requests keeps a row
            for seq in seqs:
                self.abort(seq)
            self.scheduler.retire()
            raise
        failed = [s for s in seqs if s.error]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(seqs)} requests failed, the first with {failed[0].error}")
        return [self.result(s) for s in seqs]

    def result(self, seq: Sequence) -> GenerationResult:
        text = self.tokenizer.decode(seq.output) if self.tokenizer else None
        return GenerationResult(
            list(seq.output), text, seq.llm_steps, seq.draft_tokens, seq.accepted_draft_tokens, seq.finish_reason or "",
            list(seq.log_probs), seq.seed,
        )

    # ----- one iteration --------------------------------------------------------------------
    def step(self, speculate: bool = True) -> list[Sequence]:
        """One scheduling iteration; returns the requests that received tokens."""
        start = time.perf_counter()
        forwards_before = self.forward_seconds()
        self.scheduler.retire()  # rows of requests aborted since the last step
        new = self.scheduler.admit()
        use_ssms = speculate and bool(self.ssms)
        drafting = use_ssms or (speculate and self.suffix is not None)
        if new:
            self.prefill(new, use_ssms)
        active = [s for s in self.scheduler.running if not s.finished and s not in new]
        if active:
            began, emitted = time.perf_counter(), sum(len(s.output) for s in active)
            trees, depths = self.speculate(active, use_ssms) if drafting else (self.no_trees(active), [0] * len(active))
            batch = pad_trees(trees)
            logits = process_batch(self.score(active, batch), active, trees)
            self.stats.verify_forwards += 1
            self.stats.verify_requests += len(active)
            verdicts = self.verify(active, trees, batch, logits)
            ok = [i for i, v in enumerate(verdicts) if v is not None]  # a failed request leaves alone
            if ok:
                before = [len(active[i].output) for i in ok]
                self.commit([active[i] for i in ok], [trees[i] for i in ok], [verdicts[i] for i in ok],
                            [depths[i] for i in ok])
                for i, n in zip(ok, before):
                    record(active[i], logits[i], trees[i], *verdicts[i], len(active[i].output) - n)
            if drafting and self.tree.adaptive:
                realised = (sum(len(s.output) for s in active) - emitted) / (time.perf_counter() - began)
                self.rates.observe(len(active), any(t.size > 1 for t in trees), self.predicted_rate, realised)
        self.scheduler.retire()
        if self.suffix is not None:
            self.suffix.retain(self.scheduler.running)
        self.stats.step_seconds += time.perf_counter() - start
        self.stats.forward_seconds += self.forward_seconds() - forwards_before
        return new + active

    def forward_seconds(self) -> float:
        return self.llm.seconds + sum(r.seconds for r in self.ssms)

    def prefill(self, seqs: list[Sequence], use_ssms: bool) -> None:
        """The prompt through the LLM in one chunk per request; its last logits give the first token.

        The SSMs take the prompt now too, so that later catch-up chunks stay a few tokens long (a
        long prompt batched with the catch-up of a long-running request would exceed the cache).
        """
        rows, chunks = [s.row for s in seqs], chain_batch([s.prompt for s in seqs])
        last = torch.tensor([len(s.prompt) - 1 for s in seqs])
        logits = self.llm.forward(rows, [0] * len(seqs), chunks, output_index=last)
        self.stats.prefill_forwards += 1
        for runner in self.ssms if use_ssms else []:
            runner.forward(rows, [0] * len(seqs), chunks, output_index=last)
        for seq, row in zip(seqs, logits):
            seq.llm_len = len(seq.prompt)
            seq.ssm_lens = [len(seq.prompt) if use_ssms else 0] * len(self.ssms)
            seq.llm_steps += 1
            try:
                seq.append([self.pick(row, seq)])
            except Exception as exc:  # this request's sampling failed: it fails alone
                seq.fail(exc)

    def pick(self, logits: torch.Tensor, seq: Sequence) -> int:
        root = root_only(seq.tokens[-1])
        logits = process_batch(logits[None, None], [seq], [root])[0]
        if seq.params.greedy:
            token = int(torch.argmax(logits[0]))
        elif self.tree.verifier == "gumbel":
            choice, finite = self.gumbel_choices(logits[None], [seq], torch.zeros(1, 1, dtype=torch.long))
            if not bool(finite.all()):
                raise ValueError(NO_FINITE_SCORE)
            token = int(choice[0, 0])
        else:
            token = sample(target_probs(logits[0], seq.params).cpu(), seq.generator)
        record(seq, logits, root, [], token, 1)
        return token

    def no_trees(self, seqs: list[Sequence]) -> list[Tree]:
        return [root_only(s.tokens[-1], len(self.columns)) for s in seqs]

    def speculate(self, seqs: list[Sequence], use_ssms: bool) -> tuple[list[Tree], list[int]]:
        """Each request's merged tree (SSM and suffix nodes) and the depth its SSMs drafted (0: none).

        Adaptive trees: a request whose suffix tree promises at least what its SSMs would add
        is not drafted by the SSMs that step; suffix nodes cost no drafting time."""
        suffix = self.suffix.propose(seqs) if self.suffix is not None else None
        if not self.tree.adaptive:
            depth = self.tree.depth if use_ssms else 0
            return self.merged(seqs, list(range(len(seqs))) if depth else [], depth, suffix), [depth] * len(seqs)
        chosen = list(range(len(seqs))) if use_ssms else []
        if suffix is not None and chosen:
            promise = [float(path_probability(t, self.suffix_acceptance.rate(t.confidence))[1:].sum()) for t in suffix]
            chosen = [i for i in chosen if promise[i] < sum(seqs[i].depth_gains or self.depth_gains)]
        depth = self.draft_depth([seqs[i] for i in chosen]) if chosen else 0
        chosen = chosen if depth else []
        before = sum(r.seconds for r in self.ssms)
        trees = self.merged(seqs, chosen, depth, suffix)
        spent = sum(r.seconds for r in self.ssms) - before
        probs = [path_probability(t, self.node_rates(t)) for t in trees]
        if chosen:
            ssm_probs = [path_probability(trees[i], self.node_rates(trees[i], ssm_only=True)) for i in chosen]
            self.learn_depth_gains([seqs[i] for i in chosen], [trees[i] for i in chosen], ssm_probs, depth)
        if all(t.size == 1 for t in trees):
            b = len(seqs)
            self.predicted_rate = b / max(self.llm.costs.predict(b), 1e-9)
            return trees, [0] * len(seqs)
        gains = [torch.sort(p[1:], descending=True).values for p in probs]
        factor = self.rates.factor(len(seqs))
        size, rate = choose_verify_size(gains, self.llm.costs.predict, spent, factor)
        self.predicted_rate = rate / factor if size > 1 else rate
        depths = [depth if i in chosen else 0 for i in range(len(seqs))]
        return [prune(t, best_nodes(t, p, size - 1)) for t, p in zip(trees, probs)], depths

    def merged(self, seqs: list[Sequence], chosen: list[int], depth: int, suffix: list[Tree] | None) -> list[Tree]:
        """Every request's tree: the SSMs' (drafted ``depth`` deep for requests ``chosen``, lone roots
        for the others) merged with its suffix tree where the suffix proposer is on."""
        picked = [seqs[i] for i in chosen]
        per_ssm = [draft_trees(runner, picked, s, self.tree, depth) for s, runner in enumerate(self.ssms)] if chosen else []
        drafted = dict(zip(chosen, zip(*per_ssm))) if per_ssm else {}
        trees = []
        for b, seq in enumerate(seqs):
            parts = list(drafted.get(b) or [root_only(seq.tokens[-1], 1) for _ in self.ssms])
            trees.append(merge_trees(parts + ([suffix[b]] if suffix is not None else [])))
        return trees

    def node_rates(self, tree: Tree, ssm_only: bool = False) -> torch.Tensor:
        """``[N]`` P(node accepted | parent accepted): the best of its proposers' acceptance models."""
        by = tree.proposals > 0
        n = len(self.ssms)
        rate = torch.where(by[:, :n].any(dim=1), self.acceptance.rate(tree.confidence), 0.0)
        if self.suffix is not None and not ssm_only:
            rate = torch.maximum(rate, torch.where(by[:, n], self.suffix_acceptance.rate(tree.confidence), 0.0))
        return rate

    def draft_depth(self, seqs: list[Sequence]) -> int:
        """Adaptive trees: how deep to draft, from recent gains and measured costs; while drafting
        does not pay, the SSMs still draft one level now and then (ever more rarely) to notice
        when it starts to."""
        catch_up = max(len(s.tokens) - min(s.ssm_lens) for s in seqs)
        depth = choose_depth([s.depth_gains or self.depth_gains for s in seqs], self.llm.costs.predict,
                             lambda n: sum(r.costs.predict(n) for r in self.ssms), catch_up,
                             self.tree.level_widths(), self.rates.factor(len(seqs)))
        if depth > 0:
            self.probe_wait, self.since_draft = 2, 0
            return depth
        self.since_draft += 1
        if self.since_draft < self.probe_wait:
            return 0
        self.probe_wait, self.since_draft = min(2 * self.probe_wait, MAX_PROBE_WAIT), 0
        return 1

    def learn_depth_gains(self, seqs: list[Sequence], trees: list[Tree], probs: list[torch.Tensor], depth: int) -> None:
        """Each request's best path probability (``probs``: of its SSM nodes) per drafted depth,
        averaged with its recent ones."""
        for seq, tree, prob in zip(seqs, trees, probs):
            gains = list(seq.depth_gains or self.depth_gains)
            for d in range(1, depth + 1):
                level = tree.depths == d
                seen = float(prob[level].max()) if bool(level.any()) else 0.0
                gains[d - 1] = 0.5 * (gains[d - 1] + seen)
                self.depth_gains[d - 1] += 0.1 * (seen - self.depth_gains[d - 1])
            seq.depth_gains = gains

    def calibrate(self) -> None:
        """Measure, before serving, the forwards adaptive trees choose between: every model at
        token counts up to its largest step (a warm-up pass, then the measured one)."""
        rows = self.config.max_batch_size
        tree = len(self.ssms) * self.tree.nodes_per_ssm() + 1 + (self.tree.suffix.max_nodes if self.suffix else 0)
        level = max(self.tree.level_widths())
        for runner, largest in [(self.llm, rows * tree)] + [(r, rows * level) for r in self.ssms]:
            sizes = calibration_sizes(min(largest, CALIBRATION_TOKENS))
            for _ in range(2):
                runner.costs = ForwardCosts()
                for n in sizes:
                    b = min(rows, n)
                    runner.forward(list(range(b)), [0] * b, chain_batch([[0] * -(-n // b)] * b))

    def score(self, seqs: list[Sequence], batch: TreeBatch) -> torch.Tensor:
        """One LLM forward over every request's tree: logits ``[B, N, V]`` at every node."""
        b, n = batch.tokens.shape
        nodes = NodeBatch(batch.tokens, torch.arange(n).expand(b, n), batch.depths, batch.ancestors, batch.valid)
        return self.llm.forward([s.row for s in seqs], [s.llm_len for s in seqs], nodes)

    def verify(self, seqs: list[Sequence], trees: list[Tree], batch: TreeBatch,
               logits: torch.Tensor) -> list[Verdict | None]:
        """Each request's verdict; ``None`` for a request whose verification raised (it is failed).

        Greedy requests, and sampled ones under the Gumbel verifier, share one batched greedy
        verification: of the argmax of the logits, or of the Gumbel-perturbed target scores."""
        gumbel = self.tree.verifier == "gumbel"
        by_argmax = [s.params.greedy or gumbel for s in seqs]
        finite = torch.ones(len(seqs), dtype=torch.bool)
        if any(by_argmax):
            choice = logits.argmax(dim=-1)
            sampled = [b for b, s in enumerate(seqs) if gumbel and not s.params.greedy]
            if sampled:
                choice[sampled], ok = self.gumbel_choices(logits[sampled], [seqs[b] for b in sampled],
                                                          batch.depths[sampled])
                finite[sampled] = (ok.cpu() | ~batch.valid[sampled]).all(dim=1)
            chosen = greedy_verify(batch, choice.cpu())
        without = self.tree.draft_sampling == "without_replacement"
        verdicts: list[Verdict | None] = []
        for b, (seq, tree) in enumerate(zip(seqs, trees)):
            if by_argmax[b]:
                if not finite[b]:
                    seq.fail(ValueError(NO_FINITE_SCORE))
                verdicts.append(chosen[b] if finite[b] else None)
                continue
            try:
                p = target_probs(logits[b, : tree.size], seq.params).cpu()
                if self.tree.verifier == "naive":
                    verdicts.append(naive_verify(tree, p, seq.generator))
                else:
                    verdicts.append(mss_verify(tree, p, seq.generator, without_replacement=without))
            except Exception as exc:
                seq.fail(exc)
                verdicts.append(None)
        return verdicts

    def gumbel_choices(self, logits: torch.Tensor, seqs: list[Sequence],
                       depths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gumbel-max samples ``[B, N]`` at every node, and whether each node has a token of finite
        score: a node at depth d samples the request's output position ``len(output) + d``, so any
        tree and incremental decoding draw each position alike."""
        first = torch.tensor([len(s.output) for s in seqs])
        scores = target_scores(logits, [s.params for s in seqs])
        return gumbel_choice(scores, [s.seed for s in seqs], first, depths), torch.isfinite(scores.amax(dim=-1))

    def commit(self, seqs: list[Sequence], trees: list[Tree], verdicts: list[Verdict], depths: list[int]) -> None:
        """Emit accepted tokens + bonus, then move accepted K/V into every model's committed cache.

        ``depths``: how deep the SSMs drafted each request (0: they did not run for it this step)."""
        self.llm.commit([s.row for s in seqs], [s.llm_len for s in seqs], [[0] + path for path, _ in verdicts])
        drafted = [j for j, d in enumerate(depths) if d]
        for i, runner in enumerate(self.ssms if drafted else []):
            own = [ssm_accepted(trees[j], verdicts[j][0], i, depths[j]) for j in drafted]
            runner.commit([seqs[j].row for j in drafted], [seqs[j].ssm_lens[i] for j in drafted], own)
            for j, nodes in zip(drafted, own):
                seqs[j].ssm_lens[i] += len(nodes)
        n = len(self.ssms)
        for seq, tree, (path, bonus), depth in zip(seqs, trees, verdicts, depths):
            seq.llm_len += len(path) + 1
            kept = seq.append(tree.tokens[path].tolist() + [bonus])
            accepted = min(len(path), kept)
            seq.llm_steps += 1
            seq.draft_tokens += tree.size - 1
            seq.accepted_draft_tokens += accepted
            seq.tree_sizes.append(tree.size)
            self.stats.tree_sizes[tree.size] += 1
            if tree.size == 1:
                continue
            self.stats.accepted_lengths[accepted] += 1
            by = tree.proposals > 0
            for name, mine in (("ssm", by[:, :n].any(dim=1)), ("suffix", by[:, n] if self.suffix else None)):
                if mine is None or (name == "ssm" and not n):
                    continue
                credit = int(mine[path[:accepted]].sum()) if accepted else 0
                seq.accepted_by_proposer[name] += credit
                self.stats.accepted_by_proposer[name] += credit
                if self.tree.adaptive:
                    (self.acceptance if name == "ssm" else self.suffix_acceptance).observe(tree, path, mine)
