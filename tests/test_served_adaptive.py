"""Adaptive trees merging suffix, SSM and draft-head trees and the Gumbel verifier
(configure_repository.py's defaults), in bfloat16 (its dtype on CPUs that compute it), answer like
incremental decoding, greedy or sampled with a seed, alone or under concurrent load, and count accepted
tokens per proposer."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from served import PROMPTS, expected, ids, make_repository, post
from specinfer import SamplingParams, SpecInferEngine, TreeConfig
from specinfer.serving.launcher import start_server


@pytest.fixture(scope="module")
def adaptive(tmp_path_factory):
    root = tmp_path_factory.mktemp("adaptive")
    repo, llm = make_repository(root, dtype="bfloat16")
    server = start_server(repo, log_path=root / "server.log", exit_timeout=60)
    yield repo, llm, server
    code = server.stop(grace=120)
    assert code == 0, server.log_path.read_text()[-3000:]


def test_adaptive_repository_answers_like_incremental_decoding_and_reports_tree_sizes(adaptive):
    repo, llm, server = adaptive
    config = (repo / "specinfer_llm" / "config.pbtxt").read_text()
    assert 'key: "adaptive" value: { string_value: "true" }' in config
    assert 'key: "proposers" value: { string_value: "suffix,ssm,head" }' in config
    assert 'key: "verifier" value: { string_value: "gumbel" }' in config
    engine = SpecInferEngine.from_pretrained(llm, dtype="bfloat16")
    before = server.metrics()
    steps, accepted, from_outputs = 0, 0, {"suffix": 0, "ssm": 0, "head": 0}
    repeated = "x = [1, 2, 3]\nx = [1, 2, 3]\nx = [1, 2, 3]\nx = ["  # text the suffix proposer can continue
    for prompt in PROMPTS[:2] + [repeated]:
        status, out = post(server, "/v2/models/specinfer/generate", {"text_input": prompt, "max_tokens": 12})
        assert status == 200, out
        assert ids(out) == expected(engine, prompt, 12)
        steps += out["num_llm_steps"] - 1  # the prefill verifies no tree
        accepted += out["total_accepted_draft_tokens"]
        for name in from_outputs:
            from_outputs[name] += out[f"accepted_draft_tokens_{name}"]
    metrics = server.metrics()
    grown = lambda key: metrics.get(key, 0) - before.get(key, 0)  # noqa: E731
    by = {name: grown(f'specinfer_accepted_draft_tokens{{model="specinfer_llm",proposer="{name}"}}')
          for name in from_outputs}
    assert grown('specinfer_accepted_draft_tokens{model="specinfer_llm"}') == accepted
    assert max(by.values()) <= accepted <= sum(by.values())  # a token both proposed counts for both
    assert by == from_outputs
    sizes = sum(grown(k) for k in metrics if k.startswith("specinfer_tree_size_count") and 'model="specinfer_llm"' in k)
    assert sizes == steps  # one tree size per request and verification step


SEEDED = {"text_input": PROMPTS[2], "max_tokens": 24, "temperature": 1.0, "top_p": 0.95, "random_seed": 2**63 + 5}


def others(i: int) -> dict:
    """Concurrent neighbours of other lengths: greedy, and sampled with other seeds."""
    body = {"text_input": PROMPTS[i % len(PROMPTS)] * (1 + i % 3), "max_tokens": 4 + 3 * i}
    return body if i % 2 else {**body, "temperature": 1.0, "top_k": 20, "random_seed": i}


def test_a_seeded_sampled_request_returns_the_same_tokens_alone_and_under_load(adaptive):
    _, llm, server = adaptive
    engine = SpecInferEngine.from_pretrained(llm, tree=TreeConfig(verifier="gumbel"), dtype="bfloat16")
    want = engine.generate([SEEDED["text_input"]], SamplingParams(
        max_tokens=24, temperature=1.0, top_p=0.95, seed=SEEDED["random_seed"]), speculate=False)[0].token_ids
    for model in ("specinfer", "specinfer_bls", "incremental"):
        status, out = post(server, f"/v2/models/{model}/generate", SEEDED)
        assert status == 200, out
        assert ids(out) == want, model
    with ThreadPoolExecutor(16) as pool:
        loaded = [pool.submit(post, server, "/v2/models/specinfer/generate", others(i)) for i in range(15)]
        seeded = pool.submit(post, server, "/v2/models/specinfer/generate", SEEDED)
        assert all(f.result()[0] == 200 for f in loaded)
        status, out = seeded.result()
    assert status == 200, out
    assert ids(out) == want
    unseeded = {k: v for k, v in SEEDED.items() if k != "random_seed"}
    assert len({tuple(ids(post(server, "/v2/models/specinfer/generate", unseeded)[1])) for _ in range(4)}) > 1
