"""The draft head: its trees, the hidden state it drafts from, exact output beside the other
proposers, its checkpoint folder and its configuration errors."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import prompts, trees_pay
from specinfer import SamplingParams, SpecInferEngine, TreeConfig
from specinfer.config import SuffixConfig
from specinfer.model import Transformer
from specinfer.proposers import DraftHead, HeadProposer
from specinfer.proposers.head import Int8Linear, head_tree, int8_rows
from specinfer.runner import ModelRunner, chain_batch
from specinfer.sequence import Sequence
from specinfer.verify import Verdicts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "build_scripts"))  # benchmark.py's replay

PROMPTS = prompts(8, seed=43)
PARAMS = [SamplingParams(max_tokens=10 + (i * 5) % 13, ignore_eos=True) for i in range(len(PROMPTS))]


def hidden_along(model: Transformer, tokens: list[int], prompt: int | None = None) -> torch.Tensor:
    """The LLM's final hidden states at every position of ``tokens`` (one causal forward); with
    ``prompt``, its first ``prompt`` tokens in the prompt's role and the rest as generated ones (a
    chain: incremental decoding's bits), as the engine computes them."""
    runner = ModelRunner(model, 1, len(tokens) + 2, "sdpa", True)
    if prompt is None:
        return runner.forward([0], [0], chain_batch([tokens]), hidden=True, prompt=True)[1][0]
    first = runner.forward([0], [0], chain_batch([tokens[:prompt]]), hidden=True, prompt=True)[1][0]
    rest = runner.forward([0], [prompt], chain_batch([tokens[prompt:]]), hidden=True)[1][0]
    return torch.cat([first, rest])


@pytest.fixture(scope="module")
def head_folder(models, tmp_path_factory):
    """A head fitted to the test LLM's own greedy continuations of PROMPTS (so that it is accepted
    often enough to be exercised), saved as a folder."""
    engine = SpecInferEngine.from_pretrained(models["llm"], max_batch_size=8)
    model = engine.llm.model
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True), speculate=False)
    embed, output = model.model.embed_tokens.weight.detach(), model.lm_head.weight.detach()
    states, nexts = [], []
    for p, r in zip(PROMPTS, outs):
        seq = p + r.token_ids
        h = hidden_along(model, seq)
        for t in range(len(p) - 1, len(seq) - 2):  # state at t, fed token t+1, label t+2
            states.append(h[t])
            nexts.append(seq[t + 1: t + 3])
    h, x = torch.stack(states), torch.tensor(nexts)
    torch.manual_seed(0)
    head = DraftHead(h.shape[1], 64, torch.arange(embed.shape[0]))
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    with torch.enable_grad():
        for _ in range(300):
            loss = F.cross_entropy(head.step(h, embed[x[:, 0]]) @ output.T, x[:, 1])
            opt.zero_grad()
            loss.backward()
            opt.step()
    folder = tmp_path_factory.mktemp("head")
    head.save(folder, note="fitted by tests/test_head.py")
    return folder


def test_head_tree_lists_every_levels_children_after_their_parents():
    parents, depths = head_tree((3, 1, 2))
    assert parents.tolist() == [-1, 0, 0, 0, 1, 2, 3, 4, 4, 5, 5, 6, 6]
    assert depths.tolist() == [0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3]


def test_proposer_drafts_the_top_children_of_its_state_level_by_level():
    torch.manual_seed(1)
    hidden, vocab = 8, torch.tensor([5, 9, 2, 7, 11, 3])
    head = DraftHead(hidden, 16, vocab)
    embed, output = torch.randn(12, hidden), torch.randn(12, hidden)
    proposer = HeadProposer(head, embed, output, rows=4, expansion=(2, 1))
    state = torch.randn(2, hidden)
    proposer.remember([3, 1], state)
    seqs = [Sequence(i, [1], SamplingParams(), frozenset(), None) for i in range(2)]
    seqs[0].row, seqs[1].row = 3, 1
    batch = proposer.propose(seqs, torch.tensor([4, 6]))
    assert batch.tokens.shape == (2, 5) and batch.tokens[:, 0].tolist() == [4, 6]
    assert bool(batch.selected.all()) and batch.proposals[:, 1:].eq(1).all() and batch.proposals[:, 0].eq(0).all()
    rows = Int8Linear(output[vocab]).dequantized()  # the rows as the CPU proposer reads them
    assert (rows - output[vocab]).abs().max() <= output[vocab].abs().max() / 254 + 1e-6  # half a step of 127
    assert int8_rows(output[vocab])[0].dtype == torch.int8
    assert isinstance(head.up, torch.nn.Linear) and proposer.head is not head  # the caller's head keeps its layers
    # the weights the CPU proposer reads, its MLP's int8 too; its products round apart from these float
    # ones, so the choices must be equal and the confidences close
    read = DraftHead(hidden, 16, vocab)
    read.load_state_dict({**head.state_dict(), "up.weight": Int8Linear(head.up.weight).dequantized(),
                          "down.weight": Int8Linear(head.down.weight).dequantized()})
    assert not torch.equal(read.up.weight, head.up.weight)
    for b, root in enumerate([4, 6]):  # recomputed by hand, one node at a time
        s1 = read.step(state[b], embed[root])
        p1 = torch.softmax(s1 @ rows.T, -1)
        top = p1.topk(2)
        assert batch.tokens[b, 1:3].tolist() == vocab[top.indices].tolist()
        assert torch.allclose(batch.confidence[b, 1:3], top.values)
        for i in range(2):
            s2 = read.step(s1, embed[vocab[top.indices[i]]])
            p2 = torch.softmax(s2 @ rows.T, -1)
            assert int(batch.tokens[b, 3 + i]) == int(vocab[p2.argmax()])
            assert torch.allclose(batch.confidence[b, 3 + i], p2.max())
    assert set(batch.tokens[:, 1:].flatten().tolist()) <= set(vocab.tolist())  # only its vocabulary
    with pytest.raises(ValueError, match="head_expansion asks for up to 7 children"):
        HeadProposer(head, embed, output, rows=4, expansion=(7,))  # more children than its 6 tokens
    with pytest.raises(ValueError, match="token ids up to 11 .* the LLM has 10"):
        HeadProposer(head, embed[:10], output[:10], rows=4, expansion=(2,))


def test_head_is_saved_and_loaded_and_checks_the_hidden_size(tmp_path):
    head = DraftHead(8, 16, torch.tensor([1, 2, 3]))
    head.save(tmp_path, train_steps=1)
    back = DraftHead.from_pretrained(tmp_path, 8)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), back.state_dict().values()))
    with pytest.raises(ValueError, match="hidden states of 8 values, the LLM's have 64"):
        DraftHead.from_pretrained(tmp_path, 64)


def test_configuration_errors(models):
    with pytest.raises(ValueError, match="no draft head was given"):
        SpecInferEngine.from_pretrained(models["llm"], tree=TreeConfig(proposers=("head",)))
    with pytest.raises(ValueError, match="head_expansion must be integers >= 1"):
        TreeConfig(proposers=("head",), head_expansion=(2, 0))
    with pytest.raises(ValueError, match="4 head nodes builds up to"):
        TreeConfig(expansion=(1,), proposers=("head",), head_expansion=(2, 1), max_tree_tokens=4)


def check_states(models, head_folder) -> tuple[int, int, int]:
    """Run 4 requests through 2 cache rows (rows reused; one request sampled, MSS-verified) and after
    every step compare the state each running request's next tree starts from with the LLM's hidden
    state at the token before its last one (the node whose logits chose that token), as a fresh
    forward over the whole text computes it. Returns (checks, matches, checks right after a step that
    accepted drafts for that request)."""
    tree = TreeConfig(expansion=(1,), proposers=("head",), head_expansion=(2, 1))
    engine = SpecInferEngine.from_pretrained(models["llm"], tree=tree, max_batch_size=2, head=head_folder)
    params = [SamplingParams(max_tokens=12, ignore_eos=True)] * 3 + [
        SamplingParams(max_tokens=12, temperature=0.8, seed=5, ignore_eos=True)]
    seqs = [engine.new_sequence(p, sp) for p, sp in zip(PROMPTS[:4], params)]
    for seq in seqs:
        engine.add(seq)
    checks = matches = after_acceptance = 0
    while not all(s.finished for s in seqs):
        before = {id(s): s.accepted_draft_tokens for s in seqs}
        engine.step()
        for seq in engine.scheduler.running:
            if not seq.finished:
                expected = hidden_along(engine.llm.model, seq.tokens, len(seq.prompt))[len(seq.tokens) - 2]
                checks += 1
                matches += torch.equal(engine.head.hidden[seq.row], expected)
                after_acceptance += seq.accepted_draft_tokens > before[id(seq)]
    return checks, matches, after_acceptance


def test_head_drafts_from_the_hidden_state_at_the_last_verified_node(models, head_folder):
    """Bit for bit (the LLM is batch-invariant), greedy and sampled, through reused rows."""
    checks, matches, after_acceptance = check_states(models, head_folder)
    assert checks >= 20 and after_acceptance >= 3
    assert matches == checks


def test_a_head_handed_its_roots_state_fails_the_same_check(models, head_folder, monkeypatch):
    """Negative control: the root's state instead of the last accepted node's differs whenever drafts
    were accepted."""
    monkeypatch.setattr(Verdicts, "last_nodes", lambda self: torch.zeros_like(self.lengths))
    checks, matches, after_acceptance = check_states(models, head_folder)
    assert after_acceptance > 0 and matches < checks


@pytest.fixture(scope="module")
def reference(models):
    engine = SpecInferEngine.from_pretrained(models["llm"], max_batch_size=8)
    return [r.token_ids for r in engine.generate(PROMPTS, PARAMS, speculate=False)]


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("proposers", [("head",), ("suffix", "head"), ("suffix", "ssm", "head")])
@pytest.mark.parametrize("batch", [1, 8])
def test_greedy_equals_incremental(models, head_folder, reference, proposers, adaptive, batch):
    tree = TreeConfig(expansion=(1, 2), adaptive=adaptive, proposers=proposers, head_expansion=(2, 1, 1),
                      suffix=SuffixConfig(global_tokens=1000))
    engine = SpecInferEngine.from_pretrained(models["llm"], [models["close"]], tree=tree, max_batch_size=batch,
                                             head=head_folder)
    trees_pay(engine)
    results = engine.generate(PROMPTS, PARAMS)
    assert [r.token_ids for r in results] == reference
    assert engine.stats.accepted_by_proposer["head"] > 0
    assert set(engine.stats.accepted_by_proposer) == {"ssm" if p == "ssm" else p for p in proposers}
    assert sum(r.accepted_draft_tokens for r in results) <= sum(engine.stats.accepted_by_proposer.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("batch", [1, 8])
def test_cuda_bfloat16_greedy_equals_incremental(models, head_folder, batch):
    """On CUDA in bfloat16 (the served dtype there), head and suffix trees give plain decoding's tokens."""
    tree = TreeConfig(expansion=(1,), proposers=("suffix", "head"), head_expansion=(2, 1, 1))
    engine = SpecInferEngine.from_pretrained(models["llm"], tree=tree, max_batch_size=batch, head=head_folder,
                                             device="cuda", dtype="bfloat16")
    trees_pay(engine)
    plain = [r.token_ids for r in engine.generate(PROMPTS, PARAMS, speculate=False)]
    assert [r.token_ids for r in engine.generate(PROMPTS, PARAMS)] == plain
    assert engine.stats.accepted_by_proposer["head"] > 0


def test_sampled_requests_stay_seeded_with_the_head(models, head_folder):
    """Sampled output with head trees is the one its seed gives: the same with and without speculation
    under the Gumbel verifier (which samples every position from the seed)."""
    tree = TreeConfig(expansion=(1,), proposers=("suffix", "head"), verifier="gumbel", head_expansion=(2, 1))
    engine = SpecInferEngine.from_pretrained(models["llm"], tree=tree, max_batch_size=4, head=head_folder)
    params = [SamplingParams(max_tokens=16, temperature=0.9, seed=7 + i, ignore_eos=True) for i in range(4)]
    plain = engine.generate(PROMPTS[:4], params, speculate=False)
    spec = engine.generate(PROMPTS[:4], params)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert sum(r.accepted_draft_tokens for r in spec) > 0


def test_cuda_graphs_default_off_with_the_head():
    """Graphed forwards do not return hidden states: with the head the default leaves graphs off."""
    from specinfer import EngineConfig

    assert EngineConfig(device="cuda", tree=TreeConfig(proposers=("head",))).cuda_graphs is False
    assert EngineConfig(device="cuda", tree=TreeConfig(proposers=("suffix",))).cuda_graphs is True


@pytest.mark.parametrize("proposers", [("suffix",), ("head",), ("suffix", "head")])
def test_the_benchmarks_ceiling_replay_takes_the_steps_of_an_engine_verifying_every_node(models, head_folder, proposers):
    """``benchmark.py --ceiling`` replays answers without the LLM; an engine without adaptive trees
    verifies every node its proposers offer, so it takes the replay's steps."""
    from benchmark import replay

    tree = TreeConfig(expansion=(1,), proposers=proposers)
    engine = SpecInferEngine.from_pretrained(models["llm"], tree=tree, max_batch_size=1,
                                             head=head_folder if "head" in proposers else None)
    model = engine.llm.model
    head = DraftHead.from_pretrained(head_folder, model.args.hidden_size)
    accepted = 0
    for p, params in zip(PROMPTS, PARAMS):
        r = engine.generate([p], params)[0]
        steps, tree_tokens = replay(model, head, proposers, p, r.token_ids, hidden_along(model, p + r.token_ids), tree)
        assert (steps, tree_tokens) == (r.llm_steps, r.draft_tokens + r.llm_steps - 1)  # a root per verification
        accepted += r.accepted_draft_tokens
    assert accepted > 0  # the trees were accepted, so the replay followed them


def test_configure_repository_refuses_what_the_head_cannot_serve(models, tmp_path):
    import subprocess

    script = Path(__file__).resolve().parents[1] / "build_scripts" / "configure_repository.py"
    run = lambda *args: subprocess.run([sys.executable, str(script), "--llm", str(models["llm"]),  # noqa: E731
                                        "--output", str(tmp_path / "repo"), *args], capture_output=True, text=True)
    out = run("--proposers", "suffix,head")
    assert out.returncode != 0 and "the proposer 'head' needs --head" in out.stderr
    out = run("--head", str(tmp_path), "--tensor-parallel", "2")
    assert out.returncode != 0 and "not with --tensor-parallel or --cuda-graphs" in out.stderr
    out = run("--head", str(tmp_path / "missing"))
    assert out.returncode != 0 and "is not a draft head's folder" in out.stderr


def test_make_draft_head_trains_on_its_cached_data_and_saves_the_head(models, tmp_path):
    """make_draft_head's train stage: the target states its loss reads (``target_states``) are the
    LLM's own hidden states one position on (its output layer reads each one's label back), and the
    stage trains (its zero-initialised ``down`` moves), reports and saves a head that loads (it once
    failed saving, its output folder shadowed by the output layer's rows). What the demo head learns
    is measured by its own report (``config.json``), not here."""
    import make_draft_head as mdh

    engine = SpecInferEngine.from_pretrained(models["llm"], max_batch_size=8)
    data = mdh.continue_and_read(engine, PROMPTS)
    at, x, flat = mdh.windows(data)
    lm_head = engine.llm.model.lm_head.weight.detach().float()
    for j in range(mdh.DEPTH):
        seen = x[:, j + 1] >= 0
        read = (mdh.target_states(flat, at[seen], j).float() @ lm_head.T).argmax(-1)
        assert float((read == x[seen, j + 1]).float().mean()) > 0.95
    torch.save(data, tmp_path / "train.pt")
    torch.save({"open": data}, tmp_path / "held_out.pt")
    mdh.stage_train(models["llm"], tmp_path, tmp_path / "head", steps=20, batch=128)
    hidden = engine.llm.model.args.hidden_size
    head = DraftHead.from_pretrained(tmp_path / "head", hidden)
    report = DraftHead.read_config(tmp_path / "head", hidden)["held_out_agreement_by_depth"]["open"]
    assert len(report) == mdh.DEPTH and all(0 <= a <= 1 for a in report), report
    assert float(head.down.weight.detach().abs().max()) > 0
