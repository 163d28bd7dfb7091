"""SpecInferEngine: speculate with the SSMs, verify every tree in one LLM forward, commit.

One iteration (``step``) is a pipeline over all running requests at once: admit + prefill
newcomers, ``propose`` (the proposers' trees, the SSMs', the suffix proposer's and the draft head's,
merged into one ``TreeBatch``; adaptive trees let
``AdaptivePolicy`` choose what to draft and verify), ``score`` (one LLM forward), ``verify`` (one
batched greedy verification; the sampling verifiers request by request), ``commit`` (accepted K/V
moved in one copy per model, then tokens out from one transfer of the step's results).
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

from .adaptive import AdaptivePolicy
from .config import DTYPES, EngineConfig, SamplingParams, TreeConfig
from .log_probs import record
from .logits_processors import process_batch
from .model import Transformer
from .model.batch_invariance import MAX_TREE_TOKENS
from .model.cuda_graphs import GraphedModel
from .proposers import DraftHead, HeadProposer, Plan, SsmProposer, SuffixProposer
from .runner import ModelRunner, NodeBatch, chain_batch
from .runtimes import load_model
from .sampling import first_max, gumbel_choice, make_generator, sample, target_probs, target_scores
from .scheduler import Scheduler
from .sequence import Sequence
from .tokenizer import TextTokenizer
from .tree import TreeBatch, merge, roots
from .verify import Verdict, Verdicts, greedy_verify, mss_verify, naive_verify

if TYPE_CHECKING:
    from .parallel.leader import Workers

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
        tokenizer: TextTokenizer | None = None, head: DraftHead | None = None,
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
        if "head" in tree.proposers and head is None:
            raise ValueError("proposers include 'head' but no draft head was given (from_pretrained(head=FOLDER), "
                             "or the repository parameter head)")
        if "head" in tree.proposers and (not isinstance(llm, Transformer) or config.cuda_graphs):
            raise ValueError("the draft head reads the LLM's hidden states: it needs the eager PyTorch LLM "
                             "(not tensor-parallel, not with CUDA graphs)")
        tree.check_size(max(1, len(ssms)))
        if config.batch_invariant and tree.max_tree_tokens > MAX_TREE_TOKENS:  # (the kernel's own, PATH_REGION, is higher)
            raise ValueError(f"max_tree_tokens={tree.max_tree_tokens} is more than the batch-invariant attention "
                             f"verifies in one tree ({MAX_TREE_TOKENS}); lower it or turn batch_invariant off")
        if max(tree.expansion) > vocab:
            raise ValueError(f"expansion width {max(tree.expansion)} exceeds the vocabulary ({vocab})")
        self.config, self.tree, self.tokenizer = config, tree, tokenizer
        self.vocab = vocab
        self.max_context = config.max_context or llm.args.max_position_embeddings
        slots = self.max_context + tree.max_tree_tokens + 1
        for ssm in ssms:  # only the LLM's bits decide the output; an SSM only proposes
            if isinstance(ssm, Transformer) and ssm is not llm:
                ssm.batch_invariant(False)
        if isinstance(llm, Transformer):
            llm.batch_invariant(config.batch_invariant)
        if config.cuda_graphs and config.attention == "triton":  # graphs need the kernel's device-side lengths
            llm = GraphedModel(llm) if isinstance(llm, Transformer) else llm  # not a tensor-parallel proxy
            ssms = [GraphedModel(m) if isinstance(m, Transformer) else m for m in ssms]
        invariant = config.batch_invariant
        self.llm = ModelRunner(llm, config.max_batch_size, slots, config.attention, invariant)
        self.ssms = [ModelRunner(m, config.max_batch_size, slots, getattr(m, "attention", config.attention), False)
                     for m in ssms]
        self.eos_ids = frozenset(llm.args.eos_token_ids)
        self.scheduler = Scheduler(config.max_batch_size)
        self.stats = EngineStats()
        self._ids = count()
        self.drafters = [SsmProposer(runner, i, tree) for i, runner in enumerate(self.ssms)]
        self.suffix = SuffixProposer(tree.suffix) if "suffix" in tree.proposers else None
        self.head = (HeadProposer(head, llm.model.embed_tokens.weight, llm.lm_head.weight, config.max_batch_size,
                                  tree.head_expansion) if "head" in tree.proposers else None)
        self.free = [p for p in (self.suffix, self.head) if p is not None]  # draft for every request, no SSM forward
        self.columns = ["ssm"] * len(self.ssms) + [p.name for p in self.free]  # TreeBatch.proposals' columns
        self.policy = (AdaptivePolicy(self.llm, self.ssms, tree, config.max_batch_size, tuple(self.columns[len(self.ssms):]))
                       if tree.adaptive and self.columns else None)
        if self.policy is not None:
            self.policy.calibrate(config.max_batch_size, 1 + sum(tree.draft_nodes(len(self.ssms))))

    @classmethod
    def from_pretrained(
        cls, llm: str | Path, ssms: Seq[str | Path] = (), tree: TreeConfig = TreeConfig(),
        device: str = "cpu", dtype: str = "float32", max_batch_size: int = 16, max_context: int | None = None,
        attention: str | None = None, tensor_parallel_size: int = 1, workers: "Workers | None" = None,
        ssm_engine: str = "torch", cuda_graphs: bool | None = None, batch_invariant: bool = True, offload: str = "none",
        head: str | Path | None = None,
    ) -> "SpecInferEngine":
        """``tensor_parallel_size > 1`` shards the LLM over that many processes (``parallel/``), spawned
        here unless ``workers`` says otherwise (``parallel.MpiWorkers`` under mpiexec); ``close()`` stops them.
        ``head``: a draft head's folder (``proposers/head.py``), for ``tree.proposers`` with ``"head"``."""
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
            drafter = (DraftHead.from_pretrained(head, target.args.hidden_size)
                       if head is not None and "head" in tree.proposers else None)
            return cls(target, drafts, config, TextTokenizer.from_checkpoint(llm), drafter)
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

    # what a serving loop reads (serving/loop.py), so that it never reaches into the engine's parts
    def has_work(self) -> bool:
        """Whether any request waits or runs (aborted ones until a step or ``retire`` frees their rows)."""
        return self.scheduler.has_work()

    def retire(self) -> None:
        """Free the rows of finished and aborted requests now rather than at the next step."""
        self.scheduler.retire()

    def occupancy(self) -> tuple[int, int]:
        """Requests holding a cache row, requests waiting for one."""
        return len(self.scheduler.running), len(self.scheduler.waiting)

    @property
    def kv_cache_tokens(self) -> int:
        """Token slots of the LLM's KV cache, all rows together."""
        return self.config.max_batch_size * self.llm.cache.slots

    def stats_snapshot(self) -> EngineStats:
        """A copy of the running totals that later steps leave as it is: two differ by what happened between."""
        return EngineStats(**{k: Counter(v) if isinstance(v, Counter) else v for k, v in vars(self.stats).items()})

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
    @torch.inference_mode()  # every small tensor operation of the step skips autograd's bookkeeping (~15% of merge)
    def step(self, speculate: bool = True) -> list[Sequence]:
        """One scheduling iteration: admit and prefill, propose, score, verify, commit; returns the
        requests that received tokens."""
        start, forwards_before = time.perf_counter(), self.forward_seconds()
        self.scheduler.retire()  # rows of requests aborted since the last step
        new = self.scheduler.admit()
        if new:
            self.prefill(new)
        active = [s for s in self.scheduler.running if not s.finished and s not in new]
        if active:
            # a batch past the limit decodes plainly (nothing to price or learn); newcomers still running count,
            # so that a filling batch does not speculate its first arrivals ahead of the rest (they would finish apart)
            limit = self.tree.max_speculative_batch
            speculate = speculate and not 0 < limit < len(active) + sum(not s.finished for s in new)
            began, emitted = time.perf_counter(), sum(len(s.output) for s in active)
            batch, drafted = self.propose(active, speculate)
            logits, hidden = self.score(active, batch)
            logits = process_batch(logits, active, batch)
            verdicts, ok = self.verify(active, batch, logits)
            self.commit(active, batch, verdicts, ok, drafted, logits)
            if self.head is not None:  # the state at each request's last verified node, for its next tree
                last = verdicts.last_nodes().to(hidden.device)
                self.head.remember([s.row for s in active], hidden[torch.arange(len(active), device=hidden.device), last])
            if self.policy is not None and speculate:
                realised = (sum(len(s.output) for s in active) - emitted) / (time.perf_counter() - began)
                self.policy.observe(batch, verdicts.on_path(batch.tokens.shape[1]), ok, realised)
        self.scheduler.retire()
        if self.suffix is not None:
            self.suffix.retain(self.scheduler.running)
        self.stats.step_seconds += time.perf_counter() - start
        self.stats.forward_seconds += self.forward_seconds() - forwards_before
        return new + active

    def forward_seconds(self) -> float:
        return self.llm.seconds + self.drafting_seconds()

    def drafting_seconds(self) -> float:
        return sum(r.seconds for r in self.ssms) + (self.head.seconds if self.head else 0.0)

    def prefill(self, seqs: list[Sequence]) -> None:
        """The prompt through the LLM in one chunk per request; its last logits give the first token.
        The SSMs see it only when they first draft for the request (``draft.catch_up``)."""
        rows, chunks = [s.row for s in seqs], chain_batch([s.prompt for s in seqs])
        last = torch.tensor([len(s.prompt) - 1 for s in seqs])
        logits = self.llm.forward(rows, [0] * len(seqs), chunks, output_index=last, priced=False, hidden=self.head is not None,
                                  prompt=True)
        if self.head is not None:
            logits, hidden = logits
            self.head.remember(rows, hidden)
        self.stats.prefill_forwards += 1
        if self.policy is not None:
            self.policy.admit(rows)
        for seq, row in zip(seqs, logits):
            seq.llm_len = len(seq.prompt)
            seq.ssm_lens = [0] * len(self.ssms)
            seq.llm_steps += 1
            try:
                seq.append([self.pick(row, seq)])
            except Exception as exc:  # this request's sampling failed: it fails alone
                seq.fail(exc)

    def pick(self, logits: torch.Tensor, seq: Sequence) -> int:
        logits = process_batch(logits[None, None], [seq], roots(torch.tensor([seq.tokens[-1]]), 0))[0]
        if seq.params.greedy:
            token = int(first_max(logits[0]))
        elif self.tree.verifier == "gumbel":
            choice, finite = self.gumbel_choices(logits[None], [seq], torch.zeros(1, 1, dtype=torch.long))
            if not bool(finite.all()):
                raise ValueError(NO_FINITE_SCORE)
            token = int(choice[0, 0])
        else:
            token = sample(target_probs(logits[0], seq.params).cpu(), seq.generator)
        record(seq, logits, [token], 1)
        return token

    def propose(self, seqs: list[Sequence], speculate: bool) -> tuple[TreeBatch, torch.Tensor]:
        """Every request's tree (the SSMs', the suffix proposer's and the draft head's merged), and how deep the SSMs
        drafted each request (``[B]``, 0: not this step). Adaptive trees leave the choice of drafting
        and of the nodes to verify to the policy."""
        b = len(seqs)
        last = torch.tensor([s.output[-1] if s.output else s.prompt[-1] for s in seqs])
        if (not speculate or not self.columns  # worth_proposing sets the plain step's predicted rate too
                or (self.policy is not None and not self.policy.worth_proposing(b))):
            return roots(last, len(self.columns)), torch.zeros(b, dtype=torch.long)
        before = self.drafting_seconds()
        free = [merge([proposer.propose(seqs, last) for proposer in self.free])] if self.free else []
        plan = (Plan(torch.full((b,), bool(self.ssms)), self.tree.depth) if self.policy is None
                else self.policy.plan(seqs, free[0] if free else None))
        parts = [proposer.propose(seqs, last, plan) for proposer in self.drafters]
        batch = merge(parts + free)
        if self.policy is not None:
            batch = self.policy.prune(batch, [s.row for s in seqs], plan, self.drafting_seconds() - before)
        return batch, torch.where(plan.chosen, plan.depth, 0)

    def score(self, seqs: list[Sequence], batch: TreeBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One LLM forward over every request's tree: logits ``[B, N, V]`` at every node, and the
        hidden states there (``[B, N, H]``) where the draft head reads them."""
        b, n = batch.tokens.shape
        self.stats.verify_forwards += 1
        self.stats.verify_requests += b
        nodes = NodeBatch(batch.tokens, torch.arange(n).expand(b, n), batch.depths, batch.ancestors, batch.valid)
        out = self.llm.forward([s.row for s in seqs], [s.llm_len for s in seqs], nodes, hidden=self.head is not None)
        return out if self.head is not None else (out, None)

    def verify(self, seqs: list[Sequence], batch: TreeBatch, logits: torch.Tensor) -> tuple[Verdicts, torch.Tensor]:
        """Every request's verdict, and ``[B]`` whether it stands (a request whose verification
        raised is failed and commits nothing).

        Greedy requests, and sampled ones under the Gumbel verifier, share one batched greedy
        verification: of the argmax of the logits, or of the Gumbel-perturbed target scores. The
        other verifiers sample request by request."""
        gumbel = self.tree.verifier == "gumbel"
        by_argmax = torch.tensor([s.params.greedy or gumbel for s in seqs])
        ok = torch.ones(len(seqs), dtype=torch.bool)
        one_by_one = (~by_argmax).nonzero().flatten().tolist()
        rows: list[Verdict] = [([], 0)] * len(seqs)
        if bool(by_argmax.any()):
            choice = first_max(logits)
            sampled = [b for b, s in enumerate(seqs) if gumbel and not s.params.greedy]
            if sampled:
                choice[sampled], finite = self.gumbel_choices(logits[sampled], [seqs[b] for b in sampled],
                                                              batch.depths[sampled])
                ok[sampled] = (finite.cpu() | ~batch.valid[sampled]).all(dim=1)
            verdicts = greedy_verify(batch, choice.cpu())
            for b in (~ok).nonzero().flatten().tolist():
                seqs[b].fail(ValueError(NO_FINITE_SCORE))
            if not one_by_one:
                return verdicts, ok
            rows = verdicts.rows()
        without = self.tree.draft_sampling == "without_replacement"
        for b in one_by_one:
            seq, tree = seqs[b], batch.tree(b)
            try:
                p = target_probs(logits[b, : tree.size], seq.params).cpu()
                if self.tree.verifier == "naive":
                    rows[b] = naive_verify(tree, p, seq.generator)
                else:
                    rows[b] = mss_verify(tree, p, seq.generator, without_replacement=without)
            except Exception as exc:
                seq.fail(exc)
                ok[b] = False
        return Verdicts.stack(rows), ok

    def gumbel_choices(self, logits: torch.Tensor, seqs: list[Sequence],
                       depths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gumbel-max samples ``[B, N]`` at every node, and whether each node has a token of finite
        score: a node at depth d samples the request's output position ``len(output) + d``, so any
        tree and incremental decoding draw each position alike."""
        first = torch.tensor([len(s.output) for s in seqs])
        scores = target_scores(logits, [s.params for s in seqs])
        return gumbel_choice(scores, [s.seed for s in seqs], first, depths), torch.isfinite(scores.amax(dim=-1))

    def commit(self, seqs: list[Sequence], batch: TreeBatch, verdicts: Verdicts, ok: torch.Tensor,
               drafted: torch.Tensor, logits: torch.Tensor) -> None:
        """Move accepted K/V into every model's committed cache, in one batched copy per model, then
        emit each request's accepted tokens + bonus.

        ``drafted [B]``: how deep the SSMs drafted each request (0: they did not run for it this
        step); an SSM holds K/V for its own nodes along the accepted path, above the last level."""
        rows = [s.row for s in seqs]
        b = len(seqs)
        nodes = verdicts.nodes()
        counts = torch.where(ok, verdicts.lengths + 1, 0)
        self.llm.commit(rows, torch.tensor([s.llm_len for s in seqs]), nodes, counts)
        safe = nodes.clamp(min=0)
        lines = torch.arange(b)[:, None]
        below = (batch.depths[lines, safe] < drafted[:, None]) & (nodes >= 0) & ok[:, None]
        ssm_counts = []
        for i, runner in enumerate(self.ssms if bool((drafted > 0).any()) else []):
            own = batch.ssm_nodes[lines, safe, i]
            count = ((own >= 0) & below).long().cumprod(dim=1).sum(dim=1)
            runner.commit(rows, torch.tensor([s.ssm_lens[i] for s in seqs]), own, count)
            ssm_counts.append(count)
        self.emit(seqs, batch, verdicts, ok, ssm_counts, logits)

    def emit(self, seqs: list[Sequence], batch: TreeBatch, verdicts: Verdicts, ok: torch.Tensor,
             ssm_counts: list[torch.Tensor], logits: torch.Tensor) -> None:
        """Each request's tokens, counters and statistics, from one transfer of the step's results."""
        lines = torch.arange(len(seqs))[:, None]
        safe = verdicts.path.clamp(min=0)
        tokens = batch.tokens[lines, safe]
        by = batch.proposals[lines, safe] > 0  # [B, D, P]
        n = len(self.ssms)
        names = (["ssm"] if n else []) + self.columns[n:]
        kinds = torch.cat(([by[..., :n].any(dim=-1, keepdim=True)] if n else []) + [by[..., n:]], dim=-1)  # names' columns
        credit = torch.cumsum(kinds.long(), dim=1)  # [B, D, K] accepted draft tokens per proposer kind, by length
        host = (tokens.tolist(), verdicts.lengths.tolist(), verdicts.bonus.tolist(), ok.tolist(), batch.sizes.tolist(),
                credit.tolist(), [c.tolist() for c in ssm_counts])
        for b, (seq, toks, length, bonus, good, size, cred) in enumerate(zip(seqs, *host[:6])):
            if not good:
                continue
            for i, counts in enumerate(host[6]):
                seq.ssm_lens[i] += counts[b]
            seq.llm_len += length + 1
            kept = seq.append(toks[:length] + [bonus])
            accepted = min(length, kept)
            seq.llm_steps += 1
            seq.draft_tokens += size - 1
            seq.accepted_draft_tokens += accepted
            seq.tree_sizes.append(size)
            self.stats.tree_sizes[size] += 1
            if seq.params.log_probs:
                record(seq, logits[b, [0] + verdicts.path[b, :length].tolist()], toks[:length] + [bonus], kept)
            if size == 1:
                continue
            self.stats.accepted_lengths[accepted] += 1
            for kind, name in enumerate(names):
                got = cred[accepted - 1][kind] if accepted else 0
                seq.accepted_by_proposer[name] += got
                self.stats.accepted_by_proposer[name] += got
