"""Adaptive trees: the cost model's choices, and output unchanged whatever they are."""
from __future__ import annotations

import pytest
import torch

from conftest import prompts
from specinfer import SamplingParams, SpecInferEngine, TreeConfig
from specinfer.adaptive import (MARGIN, PROBE_ROWS, AcceptanceModel, AdaptivePolicy, RateCorrection, best_nodes, choose_depth, choose_verify_counts,
                                path_probability)
from specinfer.adaptive import ragged
from specinfer.cost_model import FixedCosts, ForwardCosts, calibration_rows, calibration_sizes
from specinfer.runner import branches, chain_batch
from specinfer.tree import TreeBuilder, pad_trees, root_only

PROMPTS = prompts(12, seed=31)
PARAMS = [SamplingParams(max_tokens=5 + (i * 5) % 13, ignore_eos=True) for i in range(len(PROMPTS))]
TREES = {"chain": (1, 1, 1, 1), "paper": (1, 1, 3, 1, 1, 1, 1, 1)}


def sample_tree():
    """root -> a (0.9) -> c (0.5); root -> b (0.3); beside a lone root (padded)."""
    b = TreeBuilder(7, selected=True)
    a = b.add(0, 10, confidence=0.9)
    b.add(0, 11, confidence=0.3)
    b.add(a, 12, confidence=0.5)
    return pad_trees([b.build(), root_only(8)])


def test_forward_costs_interpolate_and_extrapolate():
    costs = ForwardCosts()
    assert costs.predict(5) == 0.0
    costs.observe(2, 1.0)
    costs.observe(10, 3.0)
    assert costs.predict(2) == 1.0 and costs.predict(1) == 1.0
    assert costs.predict(6) == pytest.approx(2.0)
    assert costs.predict(20) == pytest.approx(6.0)
    costs.observe(2, 2.0)  # a moving average follows the machine
    assert 1.0 < costs.predict(2) < 2.0
    assert costs.predict(10) > 3.0  # and the machine's speed moves the counts not fed since


def test_forward_costs_never_fall_with_more_tokens():
    """Single timings on a loaded machine dip; the curves are fitted non-decreasing (pooling the
    counts that disagree), so no size looks cheaper than a smaller one."""
    costs = ForwardCosts()
    for n, seconds in [(1, 1.0), (2, 1.2), (3, 1.0), (4, 2.0)]:
        costs.observe(n, seconds)
    assert costs.predict(2) == costs.predict(3) == pytest.approx(1.1) and costs.predict(4) == pytest.approx(2.0)


def test_forward_costs_price_extra_tokens_apart_from_plain_decoding():
    """Extra tokens beside the roots have their own curve (what they add to plain decoding's cost),
    branching trees theirs (the attention's tree path); never measured, extra tokens are priced as
    plain decoding's, trees as chains."""
    costs = ForwardCosts()
    costs.observe(16, 1.0)  # 16 lone roots
    assert costs.predict(20, rows=16) == pytest.approx(1.25)  # as plain decoding's tokens
    costs.observe(20, 1.5, rows=16)  # 4 extra tokens, chains, add 0.5
    assert costs.predict(20, rows=16) == pytest.approx(1.5)
    assert costs.predict(24, rows=16) == pytest.approx(2.0)  # proportionally past the largest
    assert costs.predict(18, rows=16) == pytest.approx(1.25)  # and from zero below the smallest
    assert costs.predict(20, tree=True, rows=16) == pytest.approx(1.5)  # trees, never measured: as chains
    costs.observe(20, 2.0, tree=True, rows=16)
    assert costs.predict(20, tree=True, rows=16) == pytest.approx(2.0) and costs.predict(20, rows=16) == pytest.approx(1.5)
    assert not branches(chain_batch([[1, 2, 3], [4]])) and not branches(ragged(4, 5, False))  # slot order
    assert branches(ragged(4, 5, True)) and branches(ragged(1, 2, True))
    assert int(ragged(4, 5, True).valid.sum()) == int(ragged(4, 5, False).valid.sum()) == 4 + 5


def test_forward_costs_price_extra_tokens_by_the_rows_beside_them():
    """Measured on the 2-core CPU: one request's chain of 8 costs 1.02x a lone root, 7 extra tokens
    beside 15 lone roots 1.25-1.5x the roots. Extra tokens are priced at their batch size's bucket (powers
    of two), or the nearest measured one (ties: the larger)."""
    costs = ForwardCosts()
    costs.observe(1, 1.0)
    costs.observe(16, 2.0)
    costs.observe(8, 1.02, rows=1)
    costs.observe(23, 3.0, rows=16)
    assert costs.predict(8, rows=1) == pytest.approx(1.02) and costs.predict(23, rows=16) == pytest.approx(3.0)
    plain = lambda rows: 1.0 + (rows - 1) / 15  # noqa: E731
    assert costs.predict(9, rows=2) == pytest.approx(plain(2) + 0.02)  # bucket 2: 1 is nearer than 16
    assert costs.predict(11, rows=4) == pytest.approx(plain(4) + 1.0)  # bucket 4: as near to both, the larger
    assert costs.predict(19, rows=12) == pytest.approx(plain(12) + 1.0)  # bucket 16
    assert calibration_rows(1) == [1] and calibration_rows(3) == [1, 3]
    assert calibration_rows(16) == [1, 4, 16] and calibration_rows(32) == [1, 4, 16, 32]


def test_forward_costs_price_an_unfed_count_at_the_current_speed():
    """The machine slows to half speed while only count 32 is fed (a speculating engine's forwards):
    count 16 (plain decoding's) is priced at the new speed, keeping its ratio to count 32."""
    costs = ForwardCosts()
    costs.observe(16, 1.0)
    costs.observe(32, 1.25)
    for _ in range(30):
        costs.observe(32, 2.5)
    assert costs.predict(32) == pytest.approx(2.5, rel=0.02)
    assert 1.6 < costs.predict(16) <= 2.0  # most of the way from 1.0
    assert calibration_sizes(20) == [1, 2, 3, 4, 6, 9, 13, 19, 20]


def test_path_probability_and_best_nodes_keep_parents():
    batch = sample_tree()
    prob = path_probability(batch, batch.confidence)
    torch.testing.assert_close(prob, torch.tensor([[1.0, 0.9, 0.3, 0.45], [1.0, 0.0, 0.0, 0.0]]))
    assert best_nodes(batch, prob, 1)[0].tolist() == [0, 1]
    assert best_nodes(batch, prob, 2)[0].tolist() == [0, 1, 3]  # a's child before the weaker sibling b
    small = batch.select(best_nodes(batch, prob, 2))
    assert small.tokens[0].tolist() == [7, 10, 12] and small.parents[0].tolist() == [-1, 0, 1]
    assert small.sizes.tolist() == [3, 1]  # the lone root keeps its root alone
    assert small.selected[0] and small.confidence[0].tolist() == pytest.approx([1.0, 0.9, 0.5])


def test_acceptance_model_learns_from_tested_nodes_only():
    model = AcceptanceModel()
    batch = sample_tree()
    mine = batch.valid
    before = model.rate(batch.confidence[0]).clone()
    a_accepted = torch.tensor([[True, True, False, False], [True, False, False, False]])
    for _ in range(50):
        model.observe(batch, a_accepted, mine)  # a accepted, then c rejected; b rejected
    after = model.rate(batch.confidence[0])
    assert after[1] > before[1] and after[2] < before[2] and after[3] < before[3]
    untested = AcceptanceModel()
    b_accepted = torch.tensor([[True, False, True, False], [True, False, False, False]])
    for _ in range(50):
        untested.observe(batch, b_accepted, mine)  # b accepted: a rejected, c (under a) never tested
    assert untested.rate(batch.confidence[0])[3] == before[3]
    foreign = AcceptanceModel()
    foreign.observe(batch, a_accepted, torch.zeros_like(mine))  # another proposer's nodes: nothing learned
    assert torch.equal(foreign.tested, AcceptanceModel().tested)


def test_verify_counts_follow_costs():
    gains = torch.tensor([[0.9, 0.8, 0.1], [0.5, 0.0, 0.0]])
    counts, rate = choose_verify_counts(gains, lambda n: 1.0, spent=0.0)  # free: every node that can be accepted
    assert counts.tolist() == [3, 1] and rate == pytest.approx(4.3)
    assert choose_verify_counts(gains, lambda n: float(n), spent=0.0)[0].tolist() == [0, 0]  # each token a full forward
    assert choose_verify_counts(gains, lambda n: 1.0 + 0.1 * n, spent=0.0)[0].tolist() == [2, 1]  # 0.1 does not pay
    assert choose_verify_counts(gains, lambda n: 1.0, spent=0.0, factor=0.4)[0].tolist() == [0, 0]  # speculation disappoints


def test_verify_counts_differ_by_request():
    """A request with weak guesses verifies its root alone beside one whose strong tree pays: the
    forward's cost follows the real tokens, not every request padded to the largest tree."""
    gains = torch.tensor([[0.9, 0.8], [0.05, 0.0]])
    assert choose_verify_counts(gains, lambda n: 1.0 + 0.1 * n, spent=0.0)[0].tolist() == [2, 0]


def test_verify_counts_price_chains_and_branching_trees_apart():
    """Verifying a chain takes the attention's cheap path, a branching tree its tree path: the same
    two nodes pay as a chain (the second at depth 2) and not as siblings."""
    gains = torch.tensor([[0.9, 0.8]])
    chain, tree = (lambda n: 1.0 + 0.01 * n), (lambda n: 1.0 + 0.5 * n)
    assert choose_verify_counts(gains, chain, 0.0, 1.0, tree, torch.tensor([2]))[0].tolist() == [2]
    assert choose_verify_counts(gains, chain, 0.0, 1.0, tree, torch.tensor([1]))[0].tolist() == [1]
    assert choose_verify_counts(gains, chain, 0.0)[0].tolist() == [2]  # no chains given: all priced as chains


def test_depth_follows_costs():
    gains = torch.tensor([[0.8, 0.6, 0.4], [0.7, 0.5, 0.1]])
    assert choose_depth(gains, lambda n: 1.0, lambda n, tree: 0.0, 3, (1, 1, 1)) == 3
    assert choose_depth(gains, lambda n: float(n), lambda n, tree: 0.0, 3, (1, 1, 1)) == 0
    assert choose_depth(gains, lambda n: 1.0, lambda n, tree: 1.0, 3, (1, 1, 1)) == 0  # drafting costs too much
    assert choose_depth(gains, lambda n: 1.0, lambda n, tree: 0.2, 3, (1, 1, 1)) == 2  # depth 3 gains too little
    assert choose_depth(gains, lambda n: 1.0, lambda n, tree: 0.0, 3, (1, 1, 1), factor=0.3) == 0


def test_ssm_levels_wider_than_a_node_are_priced_as_trees():
    """A level of siblings takes the SSM's tree path (observed on its trees' curve): the depth that
    feeds a wide level pays that curve's price; chains and catch-up chunks the chains' curve."""
    gains = torch.tensor([[0.8, 0.6, 0.4]])
    asked = []

    def ssm_cost(n: int, tree: bool) -> float:
        asked.append((n, tree))
        return 0.5 if tree else 0.0

    assert choose_depth(gains, lambda n: 1.0, ssm_cost, 3, (1, 3, 1)) == 2  # depth 3 feeds the 3 siblings
    assert asked == [(3, False), (1, False), (3, True)]
    assert choose_depth(gains, lambda n: 1.0, ssm_cost, 3, (1, 1, 1)) == 3  # the same depths as chains


def test_rate_correction_compares_speculating_with_plain_steps():
    rates = RateCorrection()
    assert rates.factor(16) == pytest.approx(1 / MARGIN)  # nothing seen: speculation must clear the margin
    rates.observe(16, False, predicted=100.0, realised=95.0)
    rates.observe(16, True, predicted=150.0, realised=90.0)
    assert rates.factor(16) == pytest.approx(0.6 / 0.95 / MARGIN)
    assert rates.factor(9) == rates.factor(16) and rates.factor(4) == pytest.approx(1 / MARGIN)  # by powers of two


def test_rate_correction_probes_speculation_again_after_plain_steps():
    """A bad spell must not stick: only speculating steps update speculation's side of the ratio."""
    rates = RateCorrection()
    rates.observe(1, False, predicted=100.0, realised=100.0)
    rates.observe(1, True, predicted=100.0, realised=40.0)  # speculation disappointed once
    assert rates.factor(1) == pytest.approx(0.4 / MARGIN)
    for wait in (2, 4, 8):
        for _ in range(wait):
            assert rates.factor(1) == pytest.approx(0.4 / MARGIN)
            rates.observe(1, False, predicted=100.0, realised=100.0)
        assert rates.factor(1) == 1.0  # the probe: speculation judged on its predicted rate alone
        rates.observe(1, True, predicted=100.0, realised=40.0)  # still bad: the next probe waits twice as long
    rates.observe(1, False, predicted=100.0, realised=100.0)
    rates.observe(1, True, predicted=100.0, realised=200.0)  # chosen on its merits: the wait is back to 2
    assert rates.wait[1] == 2


@pytest.fixture(scope="module")
def reference(models):
    engine = SpecInferEngine.from_pretrained(models["llm"], max_batch_size=8)
    return [r.token_ids for r in engine.generate(PROMPTS, PARAMS, speculate=False)]


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("ssms", [("close",), ("close", "other")])
@pytest.mark.parametrize("tree", sorted(TREES))
def test_adaptive_greedy_equals_incremental(models, reference, tree, ssms, batch):
    engine = SpecInferEngine.from_pretrained(
        models["llm"], [models[s] for s in ssms], tree=TreeConfig(expansion=TREES[tree], adaptive=True),
        max_batch_size=batch,
    )
    results = engine.generate(PROMPTS, PARAMS)
    assert [r.token_ids for r in results] == reference
    assert sum(engine.stats.tree_sizes.values()) == engine.stats.verify_requests


def engine_with_costs(models, llm_cost, ssm_cost, expansion=(1, 1, 1)):
    engine = SpecInferEngine.from_pretrained(
        models["llm"], [models["close"]], tree=TreeConfig(expansion=expansion, adaptive=True), max_batch_size=4)
    engine.llm.costs = FixedCosts(llm_cost)
    engine.ssms[0].costs = FixedCosts(ssm_cost)
    calls = []
    forward = engine.ssms[0].forward
    engine.ssms[0].forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    return engine, calls


def test_expensive_verification_means_no_speculation(models, reference):
    engine, calls = engine_with_costs(models, lambda n: float(n), lambda n: 0.01)
    results = engine.generate(PROMPTS[:4], PARAMS[:4])
    assert [r.token_ids for r in results] == reference[:4]
    assert set(engine.stats.tree_sizes) == {1}  # only lone roots verified
    assert not calls  # each token a full forward: no node can pay, so nothing is proposed or drafted


def test_proposing_stops_where_no_node_can_pay(models):
    """A node pays only if accepted at least as often as its token's share of the forward's cost
    (divided by the rate correction); beyond every acceptance model's best, nothing is proposed."""
    engine, _ = engine_with_costs(models, lambda n: 1.0 + 0.1 * n, lambda n: 0.0)
    policy = engine.policy
    assert policy.worth_proposing(1)  # nothing observed yet: acceptance taken at its word
    model = policy.ssm_acceptance
    model.tested[:] += 100.0
    model.accepted[:] = 0.5 * model.tested  # every bin tested: accepted half of the time
    assert model.best() == pytest.approx(0.5)
    assert policy.worth_proposing(1)  # one more token costs 0.1 / 1.1 of a forward: 0.09 (0.1 with the margin)
    assert policy.worth_proposing(8)  # 0.8 / 1.8 = 0.44, 0.49 with the margin
    assert not policy.worth_proposing(16)  # 1.6 / 2.6 = 0.62
    assert policy.predicted_rate == pytest.approx(16 / 2.6)  # the plain step's, for the rate correction


def test_chains_are_priced_as_chains_only_in_a_batch_of_one(models):
    """A lone request verifying a chain takes the attention's cheap path (on the 2-core CPU a chain
    of 8 costs 1.02x a root); beside other requests the forward splits (``SplitKeys``) and extra
    tokens cost about what a tree's do, while speculating in a closed batch of several seldom
    shortens it: verification there is priced on the trees' curve, even where chains measured cheaper."""
    engine, _ = engine_with_costs(models, lambda n: 1.0, lambda n: 0.0)
    policy = engine.policy
    model = policy.ssm_acceptance
    model.tested[:] += 100.0
    model.accepted[:] = 0.5 * model.tested
    costs = engine.llm.costs = ForwardCosts()
    costs.observe(1, 1.0)
    costs.observe(2, 1.0)
    costs.observe(2, 1.01, rows=1)  # a chain of 2: 0.01 more
    costs.observe(3, 2.0, tree=True, rows=1)
    costs.observe(4, 1.02, rows=2)  # two chains beside each other: cheap, measured
    costs.observe(4, 3.0, tree=True, rows=2)
    assert policy.worth_proposing(1)  # 0.01 of a forward per token, 0.011 with the margin: below 0.5
    assert not policy.worth_proposing(2)  # priced as trees: 2.0 per 2 tokens, far above 0.5


def test_probes_draft_for_few_requests(models, reference):
    """While drafting does not pay (the SSM's forwards cost too much), its probes draft for at most
    ``PROBE_ROWS`` requests, those with the least to catch up, not the whole batch."""
    engine = SpecInferEngine.from_pretrained(models["llm"], [models["close"]], max_batch_size=8,
                                             tree=TreeConfig(expansion=(1, 1), adaptive=True))
    engine.llm.costs = FixedCosts(lambda n: 1.0 + 0.001 * n)
    engine.ssms[0].costs = FixedCosts(lambda n: 10.0)
    fed = []
    forward = engine.ssms[0].forward
    engine.ssms[0].forward = lambda rows, *a, **k: fed.append(len(rows)) or forward(rows, *a, **k)
    results = engine.generate(PROMPTS[:8], PARAMS[:8])
    assert [r.token_ids for r in results] == reference[:8]
    assert fed and max(fed) == PROBE_ROWS


def test_batches_above_max_speculative_batch_decode_plainly(models, reference, monkeypatch):
    """``max_speculative_batch``: a step of more requests verifies lone roots and proposes nothing,
    one of at most that many speculates as before; the tokens are incremental decoding's."""
    monkeypatch.setattr("specinfer.adaptive.MARGIN", 1.0)
    for limit, batch in ((2, 4), (4, 4)):
        engine = SpecInferEngine.from_pretrained(models["llm"], [models["close"]], max_batch_size=4,
                                                 tree=TreeConfig(expansion=(1, 1), adaptive=True, max_speculative_batch=limit))
        engine.llm.costs, engine.ssms[0].costs = FixedCosts(lambda n: 1.0), FixedCosts(lambda n: 0.0)
        shapes = []  # (requests, tree width) of every verification
        score = engine.score
        engine.score = lambda seqs, tree: shapes.append(tuple(tree.tokens.shape)) or score(seqs, tree)
        results = engine.generate(PROMPTS[:batch], PARAMS[:batch])
        assert [r.token_ids for r in results] == reference[:batch]
        assert all(n == 1 for b, n in shapes if b > limit) and any(n > 1 for b, n in shapes if b <= limit)
        assert any(b > limit for b, _ in shapes) == (batch > limit)
    with pytest.raises(ValueError, match="max_speculative_batch"):
        TreeConfig(max_speculative_batch=-1)


def test_a_step_above_max_speculative_batch_neither_prices_nor_teaches(models):
    """A step the limit keeps plain prices no speculation and feeds nothing to the rate correction
    (what it would teach, at its batch size, no step of that size could use); once at most the
    limit runs, steps price and observe again."""
    engine = SpecInferEngine.from_pretrained(models["llm"], [models["close"]], max_batch_size=2,
                                             tree=TreeConfig(expansion=(1,), adaptive=True, max_speculative_batch=1))
    engine.llm.costs, engine.ssms[0].costs = FixedCosts(lambda n: 1.0 + 0.1 * n), FixedCosts(lambda n: 0.0)
    engine.policy.predicted_rate = 123.0  # what an earlier step chose
    seqs = [engine.new_sequence(prompt, SamplingParams(max_tokens=n, ignore_eos=True)) for prompt, n in zip(PROMPTS, (3, 8))]
    for seq in seqs:
        engine.add(seq)
    engine.step()  # admits and prefills
    engine.step()  # two requests: above the limit
    assert engine.policy.predicted_rate == 123.0
    assert not engine.policy.rates.plain_run and not engine.policy.rates.error
    while not seqs[0].finished:
        engine.step()
    engine.step()  # one request left: within the limit
    assert engine.policy.predicted_rate != 123.0
    assert engine.policy.rates.plain_run or engine.policy.rates.error


def test_a_step_admitting_requests_counts_them_against_max_speculative_batch(models, monkeypatch):
    """The requests a step admits count toward the limit: while a batch fills, its first arrivals do
    not speculate ahead of the rest (through Triton at concurrency 32 they finished apart and their
    successors arrived one by one, each with a prompt forward of its own)."""
    monkeypatch.setattr("specinfer.adaptive.MARGIN", 1.0)  # any expected gain pays when verifying is free
    engine = SpecInferEngine.from_pretrained(models["llm"], [models["close"]], max_batch_size=4,
                                             tree=TreeConfig(expansion=(1, 1), adaptive=True, max_speculative_batch=2))
    engine.llm.costs, engine.ssms[0].costs = FixedCosts(lambda n: 1.0), FixedCosts(lambda n: 0.0)
    widths = []  # tree width of every verification
    score = engine.score
    engine.score = lambda seqs, tree: widths.append(tree.tokens.shape[1]) or score(seqs, tree)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    first = engine.new_sequence(PROMPTS[0], params)
    engine.add(first)
    engine.step()  # admits and prefills it
    engine.step()
    assert widths[-1] > 1  # alone: it speculates
    for prompt in PROMPTS[1:3]:  # newcomers that finish in their prompt's forward hold no row afterwards
        engine.add(engine.new_sequence(prompt, SamplingParams(max_tokens=1)))
    engine.step()
    assert widths[-1] > 1
    for prompt in PROMPTS[3:5]:
        engine.add(engine.new_sequence(prompt, params))
    engine.step()  # admits two beside it: three requests this step
    assert widths[-1] == 1


def test_free_verification_means_the_full_tree(models, reference, monkeypatch):
    monkeypatch.setattr("specinfer.adaptive.MARGIN", 1.0)  # any expected gain pays when nothing costs
    engine, _ = engine_with_costs(models, lambda n: 1.0, lambda n: 0.0, expansion=(2, 1, 2))
    results = engine.generate(PROMPTS[:4], PARAMS[:4])
    assert [r.token_ids for r in results] == reference[:4]
    full = 1 + TreeConfig(expansion=(2, 1, 2)).nodes_per_ssm()
    assert set(engine.stats.tree_sizes) == {full}


def test_adaptive_sampling_is_reproducible_for_the_same_decisions(models):
    """With the decisions fixed (given costs, no correction by step times) a seed fixes the output,
    and another seed changes it."""
    def run(seed):
        engine, _ = engine_with_costs(models, lambda n: 1.0 + 0.01 * n, lambda n: 0.1, expansion=(1, 2, 1))
        engine.policy.rates.observe = lambda *args: None
        params = SamplingParams(max_tokens=12, temperature=1.0, seed=seed, ignore_eos=True)
        return [r.token_ids for r in engine.generate(PROMPTS[:4], params)]

    first = run(5)
    assert run(5) == first
    assert run(6) != first


def test_policy_learns_from_real_steps(models, reference):
    """Every decision's state is fed by the steps: acceptance by confidence, gains per drafted depth
    (overall and per row), the rate correction of speculating and of plain steps."""
    engine, _ = engine_with_costs(models, lambda n: 1.0 + 0.01 * n, lambda n: 0.05)
    policy = engine.policy
    prior_tested, prior_gains = policy.ssm_acceptance.tested.sum().item(), policy.depth_gains.clone()
    results = engine.generate(PROMPTS[:4], PARAMS[:4])
    assert [r.token_ids for r in results] == reference[:4]
    assert policy.ssm_acceptance.tested.sum().item() > prior_tested
    assert policy.ssm_acceptance.accepted.sum().item() > 0
    assert not torch.equal(policy.depth_gains, prior_gains)
    assert not torch.isnan(policy.row_gains[:4]).all()
    assert (4, True) in policy.rates.error and policy.predicted_rate > 0
    before = policy.row_gains.clone()
    policy.admit([0])
    assert torch.isnan(policy.row_gains[0]).all() and torch.equal(policy.row_gains[1:], before[1:], )


class ClockedRunner:
    """A runner whose forwards advance a fake clock by a known price: ``base + rows`` for lone
    roots, plus per extra token 0.01 x rows bucket on a chain and 0.1 x rows bucket on a tree."""

    def __init__(self, clock: list[float]) -> None:
        self.clock, self.costs = clock, ForwardCosts()
        self.cache = type("Cache", (), {"slots": 512})()

    @staticmethod
    def price(rows: int, extra: int, tree: bool) -> float:
        scale = {1: 1, 2: 4, 3: 4, 4: 4}.get(rows, 16)
        return 2.0 + rows + extra * (0.1 if tree else 0.01) * scale

    def tokens(self, nodes) -> int:
        return int(nodes.valid.sum())

    def forward(self, rows, lens, nodes, output_index=None, priced=True):
        extra = self.tokens(nodes) - len(rows)
        self.clock[0] += self.price(len(rows), extra, branches(nodes))


def test_calibration_measures_every_rows_bucket_and_both_kinds(monkeypatch):
    """``calibrate`` prices plain decoding at every calibration size and, per rows bucket, what
    chains and branching trees of extra tokens add: predictions equal the runner's prices at the
    sizes it measured, each bucket its own (a bucket's curve borrowed by another would fail)."""
    clock = [0.0]
    monkeypatch.setattr("specinfer.adaptive.time.perf_counter", lambda: clock[0])
    llm = ClockedRunner(clock)
    policy = AdaptivePolicy(llm, [], TreeConfig(expansion=(1, 1, 1, 1), adaptive=True), 16, free=("suffix",))
    policy.calibrate(16, 9)
    costs = llm.costs
    for n in calibration_sizes(16):
        assert costs.predict(n) == pytest.approx(ClockedRunner.price(n, 0, False))
    for rows in calibration_rows(16):
        for extra in (2, 8):
            for tree in (False, True):
                want = ClockedRunner.price(rows, extra, tree)
                assert costs.predict(rows + extra, tree=tree, rows=rows) == pytest.approx(want), (rows, extra, tree)
