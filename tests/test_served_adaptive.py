"""The served default: adaptive trees (configure_repository.py's default) in bfloat16 (its dtype on CPUs that
compute it) answer like incremental decoding, token for token."""
from __future__ import annotations

from served import PROMPTS, expected, ids, make_repository, post
from specinfer import SpecInferEngine
from specinfer.serving.launcher import start_server


def test_adaptive_repository_answers_like_incremental_decoding_and_reports_tree_sizes(tmp_path):
    repo, llm = make_repository(tmp_path, dtype="bfloat16")
    assert 'key: "adaptive" value: { string_value: "true" }' in (repo / "specinfer_llm" / "config.pbtxt").read_text()
    server = start_server(repo, log_path=tmp_path / "server.log", exit_timeout=60)
    try:
        engine = SpecInferEngine.from_pretrained(llm, dtype="bfloat16")
        steps = 0
        for prompt in PROMPTS[:2]:
            status, out = post(server, "/v2/models/specinfer/generate", {"text_input": prompt, "max_tokens": 12})
            assert status == 200, out
            assert ids(out) == expected(engine, prompt, 12)
            steps += out["num_llm_steps"] - 1  # the prefill verifies no tree
        sizes = {k: v for k, v in server.metrics().items() if k.startswith("specinfer_tree_size_count")
                 and 'model="specinfer_llm"' in k}
        assert sum(sizes.values()) == steps  # one tree size per request and verification step
    finally:
        code = server.stop(grace=120)
    assert code == 0, server.log_path.read_text()[-3000:]
