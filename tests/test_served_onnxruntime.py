"""A served repository whose SSMs run under ONNX Runtime (configure_repository.py --ssm-engine onnxruntime)."""
from __future__ import annotations

from served import PROMPTS, expected, ids, make_repository, post
from specinfer import SpecInferEngine
from specinfer.serving.launcher import start_server


def test_repository_with_onnxruntime_ssms_answers_like_incremental_decoding(tmp_path):
    repo, llm = make_repository(tmp_path, "--ssm-engine", "onnxruntime", "--no-adaptive")
    assert 'key: "ssm_engine" value: { string_value: "onnxruntime" }' in (repo / "specinfer_llm" / "config.pbtxt").read_text()
    server = start_server(repo, log_path=tmp_path / "server.log", exit_timeout=60)
    try:
        engine = SpecInferEngine.from_pretrained(llm)
        for prompt in PROMPTS[:1]:
            status, out = post(server, "/v2/models/specinfer/generate", {"text_input": prompt, "max_tokens": 12})
            assert status == 200, out
            assert ids(out) == expected(engine, prompt, 12)
            assert out["total_draft_tokens"] > 0  # the SSMs drafted
    finally:
        code = server.stop(grace=120)
    assert code == 0, server.log_path.read_text()[-3000:]
