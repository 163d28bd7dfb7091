"""The served default: adaptive trees merging suffix and SSM trees (configure_repository.py's default), in
bfloat16 (its dtype on CPUs that compute it), answer like incremental decoding and count accepted tokens per proposer."""
from __future__ import annotations

from served import PROMPTS, expected, ids, make_repository, post
from specinfer import SpecInferEngine
from specinfer.serving.launcher import start_server


def test_adaptive_repository_answers_like_incremental_decoding_and_reports_tree_sizes(tmp_path):
    repo, llm = make_repository(tmp_path, dtype="bfloat16")
    config = (repo / "specinfer_llm" / "config.pbtxt").read_text()
    assert 'key: "adaptive" value: { string_value: "true" }' in config
    assert 'key: "proposers" value: { string_value: "suffix,ssm" }' in config
    server = start_server(repo, log_path=tmp_path / "server.log", exit_timeout=60)
    try:
        engine = SpecInferEngine.from_pretrained(llm, dtype="bfloat16")
        steps, accepted, from_outputs = 0, 0, {"suffix": 0, "ssm": 0}
        repeated = "x = [1, 2, 3]\nx = [1, 2, 3]\nx = [1, 2, 3]\nx = ["  # text the suffix proposer can continue
        for prompt in PROMPTS[:2] + [repeated]:
            status, out = post(server, "/v2/models/specinfer/generate", {"text_input": prompt, "max_tokens": 12})
            assert status == 200, out
            assert ids(out) == expected(engine, prompt, 12)
            steps += out["num_llm_steps"] - 1  # the prefill verifies no tree
            accepted += out["total_accepted_draft_tokens"]
            for name in ("suffix", "ssm"):
                from_outputs[name] += out[f"accepted_draft_tokens_{name}"]
        metrics = server.metrics()
        by = {name: metrics[f'specinfer_accepted_draft_tokens{{model="specinfer_llm",proposer="{name}"}}']
              for name in ("suffix", "ssm")}
        assert metrics['specinfer_accepted_draft_tokens{model="specinfer_llm"}'] == accepted
        assert max(by.values()) <= accepted <= sum(by.values())  # a token both proposed counts for both
        assert by == from_outputs
        sizes = {k: v for k, v in metrics.items() if k.startswith("specinfer_tree_size_count")
                 and 'model="specinfer_llm"' in k}
        assert sum(sizes.values()) == steps  # one tree size per request and verification step
    finally:
        code = server.stop(grace=120)
    assert code == 0, server.log_path.read_text()[-3000:]
