"""Make the demo models in engines/demo/ reproducibly: tokenizer, LLM and two SSMs trained on code.

Corpus: the Python standard library's sources on this machine, split by a hash of each file's path
into train (90%) and held-out (10%) files that no training sees. Fixed seeds and fixed step counts.
- tokenizer: byte-level BPE (2048 tokens) trained on the train files;
- llm: a Llama LM trained on the train files;
- ssm-a: a 1-layer Llama trained on the same text;
- ssm-b: ssm-a fine-tuned on the LLM's own greedy continuations of train-file snippets
  (distillation): it learns what the LLM says rather than what the corpus says, which ssm-a lacks.
Checkpoints are saved in bfloat16 (the engine loads them in the dtype it is asked for);
engines/demo/models.json records sizes, held-out losses, per-token latencies and build times.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 2048
SEQ = 256
ARCH = {
    "llm": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2),
    "ssm-a": dict(hidden_size=160, intermediate_size=448, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1),
    "ssm-b": dict(hidden_size=160, intermediate_size=448, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1),
}
STEPS = {"llm": 700, "ssm-a": 1500, "ssm-b": 600}  # batches of 16 x 256 tokens
LR = {"llm": 1.5e-3, "ssm-a": 3e-3, "ssm-b": 1e-3}
DISTILL = dict(snippets=2048, prompt=32, new=96)


def log(msg: str) -> None:
    print(f"[models] {msg}", flush=True)


def corpus_files() -> tuple[list[Path], list[Path]]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.rglob("*.py")
                   if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts
                   and "idlelib" not in p.parts and p.stat().st_size < 400_000)
    held = [p for p in files if int(hashlib.sha1(str(p.relative_to(lib)).encode()).hexdigest()[:8], 16) % 10 == 0]
    held_set = set(held)
    return [p for p in files if p not in held_set], held


def read(files: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def make_tokenizer(texts: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def encode(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    eos = tok.token_to_id("</s>")
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.array(ids, dtype=np.int32)


def batches(data: np.ndarray, steps: int, batch: int, seed: int):
    g = np.random.default_rng(seed)
    for _ in range(steps):
        starts = g.integers(0, len(data) - SEQ - 1, size=batch)
        yield torch.from_numpy(np.stack([data[s:s + SEQ] for s in starts]).astype(np.int64))


def held_out_loss(model: LlamaForCausalLM, data: np.ndarray, n: int = 24) -> float:
    model.eval()
    losses = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for x in batches(data, n, 8, seed=1234):
            losses.append(float(model(x, labels=x).loss))
    model.train()
    return float(np.mean(losses))


def train(name: str, data: np.ndarray, held: np.ndarray, seed: int,
          init: LlamaForCausalLM | None = None) -> tuple[LlamaForCausalLM, dict]:
    """Train from scratch, or fine-tune a copy of ``init``."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False, rope_theta=10000.0, **ARCH[name])
    model = LlamaForCausalLM(cfg)
    if init is not None:
        model.load_state_dict(init.state_dict())
    steps, lr = STEPS[name], LR[name]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = steps // 20
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    start = time.monotonic()
    for step, x in enumerate(batches(data, steps, 16, seed)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log(f"{name} step {step}/{steps} loss {float(loss):.3f} ({time.monotonic() - start:.0f} s)")
    info = {"parameters": sum(p.numel() for p in model.parameters()), "train_steps": steps,
            "train_tokens": steps * 16 * SEQ, "train_seconds": round(time.monotonic() - start, 1),
            "held_out_loss": round(held_out_loss(model, held), 4)}
    log(f"{name}: {info}")
    return model, info


def distill_data(llm_dir: Path, data: np.ndarray) -> np.ndarray:
    """The LLM's greedy continuations of train-text snippets, with the snippets, as one token stream."""
    from specinfer import SamplingParams, SpecInferEngine

    engine = SpecInferEngine.from_pretrained(llm_dir, max_batch_size=64)
    g = np.random.default_rng(7)
    starts = g.integers(0, len(data) - DISTILL["prompt"], size=DISTILL["snippets"])
    prompts = [data[s:s + DISTILL["prompt"]].tolist() for s in starts]
    results = engine.generate(prompts, SamplingParams(max_tokens=DISTILL["new"], ignore_eos=True), speculate=False)
    out: list[int] = []
    for p, r in zip(prompts, results):
        out.extend(p + r.token_ids + [2])
    return np.array(out, dtype=np.int32)


def latency_ms(folder: Path, tokens: int = 48) -> float:
    """Incremental decoding at batch size 1 in this engine, fp32: ms per generated token."""
    from specinfer import SamplingParams, SpecInferEngine

    engine = SpecInferEngine.from_pretrained(folder, max_batch_size=1)
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4, ignore_eos=True), speculate=False)
    start = time.perf_counter()
    engine.generate([[5, 6, 7, 8], [9, 10, 11]], params, speculate=False)
    return 1000 * (time.perf_counter() - start) / (2 * tokens)


def save(model: LlamaForCausalLM, tok: Tokenizer, folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    model.to(torch.bfloat16).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "engines" / "demo"))
    ap.add_argument("--force", action="store_true", help="rebuild even if the models exist")
    args = ap.parse_args()
    root = Path(args.output)
    if not args.force and (root / "models.json").is_file() and all((root / n / "config.json").is_file() for n in ARCH):
        log(f"demo models already in {root}")
        return
    begin = time.monotonic()
    train_files, held_files = corpus_files()
    log(f"corpus: {len(train_files)} train files, {len(held_files)} held-out files")
    train_text, held_text = read(train_files), read(held_files)
    tok = make_tokenizer(train_text)
    train_ids, held_ids = encode(tok, train_text), encode(tok, held_text)
    log(f"tokens: {len(train_ids):,} train, {len(held_ids):,} held-out")
    report = {"corpus": {"train_files": len(train_files), "held_out_files": len(held_files),
                         "train_tokens": int(len(train_ids)), "held_out_tokens": int(len(held_ids))}, "models": {}}
    llm, report["models"]["llm"] = train("llm", train_ids, held_ids, seed=0)
    save(llm, tok, root / "llm")
    ssm_a, report["models"]["ssm-a"] = train("ssm-a", train_ids, held_ids, seed=1)
    ssm_b_init = LlamaForCausalLM(ssm_a.config)
    ssm_b_init.load_state_dict(ssm_a.state_dict())
    save(ssm_a, tok, root / "ssm-a")
    distilled = distill_data(root / "llm", train_ids)
    log(f"distillation data: {len(distilled):,} tokens of the LLM's greedy continuations")
    ssm_b, report["models"]["ssm-b"] = train("ssm-b", distilled, held_ids, seed=2, init=ssm_b_init)
    save(ssm_b, tok, root / "ssm-b")
    for name in ARCH:
        report["models"][name]["ms_per_token_cpu_fp32"] = round(latency_ms(root / name), 3)
    report["llm_over_ssm_cost"] = round(report["models"]["llm"]["ms_per_token_cpu_fp32"]
                                        / max(report["models"][n]["ms_per_token_cpu_fp32"] for n in ("ssm-a", "ssm-b")), 2)
    report["build_seconds"] = round(time.monotonic() - begin, 1)
    (root / "models.json").write_text(json.dumps(report, indent=2))
    log(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
