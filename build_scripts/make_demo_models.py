"""Make the demo SSMs for the demo LLM (SmolLM2-135M-Instruct in engines/demo/llm) reproducibly.

Stages, each cached under engines/demo/build/ (git-ignored), fixed seeds throughout:
1. ``data`` (CPU, needs the LLM): prompts of three kinds, split by a hash into train and held-out
   (held-out topics, tasks and source files are never trained on): chat questions (topic x template,
   formatted with the LLM's chat template), English prose openings, and windows of the Python
   standard library's sources. The LLM's greedy continuations of the train prompts (this engine,
   batched incremental decoding) are the distillation data. Also the SVD of the LLM's token
   embeddings, which initialises the SSMs' (tied) embeddings in a few hundred dimensions.
2. ``train`` (CPU, or CUDA with ``--device cuda``): two Llama SSMs with the LLM's vocabulary:
   - ssm-a (192 wide, 4 layers): distilled on the LLM's greedy outputs (next-token cross-entropy
     on the tokens the LLM wrote);
   - ssm-b (128 wide, 2 layers): boost-tuned after ssm-a, as SpecInfer's paper does: the same data,
     with the tokens ssm-a predicts wrongly weighted 3x, so that it proposes what ssm-a misses.
3. ``report`` (CPU): held-out top-1 agreement with the LLM's greedy next token, per-token latency in
   this engine, and the LLM/SSM cost ratio, into engines/demo/models.json; the held-out prompts into
   engines/demo/prompts.json (the benchmark's and the main job's prompts).

  python build_scripts/make_demo_models.py            # all stages that are missing, on the CPU
  python build_scripts/make_demo_models.py --stage train --device cuda --steps 3000
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

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "engines" / "demo"
BUILD = DEMO / "build"
SEQ = 256
ARCH = {
    "ssm-a": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=3, num_key_value_heads=1),
    "ssm-b": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1),
}
BOOST = 3.0  # ssm-b's weight on the tokens ssm-a gets wrong
TOPICS = [
    "photosynthesis", "the French Revolution", "black holes", "machine learning", "climate change", "the human heart",
    "volcanoes", "the stock market", "coffee", "the Roman Empire", "recycling", "sleep", "electric cars",
    "the internet", "honeybees", "chess", "the water cycle", "vaccines", "democracy", "the moon landing", "gardening",
    "solar panels", "the piano", "earthquakes", "friendship", "time management", "the Great Wall of China", "DNA",
    "rainbows", "inflation", "the printing press", "penguins", "the Olympic Games", "bread baking", "quantum computers",
    "the Amazon rainforest", "public libraries", "bicycles", "the immune system", "jazz music", "the Renaissance",
    "tides", "cloud computing", "meditation", "the Pyramids of Giza", "plate tectonics", "social media", "elephants",
    "the theory of evolution", "renewable energy", "the Industrial Revolution", "coral reefs", "learning a language",
    "the speed of light", "healthy eating", "the Silk Road", "robots", "wind turbines", "the solar system",
    "ancient Greece", "antibiotics", "the camera", "deserts", "the human brain", "origami", "hurricanes",
    "the telephone", "volunteering", "glaciers", "cryptography", "the Moon", "marathon running", "tea", "bridges",
    "the periodic table", "butterflies", "the Cold War", "composting", "electricity", "dinosaurs",
]
CHAT_TEMPLATES = [
    "Explain {} in simple terms.", "What is {}?", "Write a short paragraph about {}.",
    "Give me three interesting facts about {}.", "Why is {} important?", "Write a short story about {}.",
    "Summarize what everyone should know about {}.", "How would you explain {} to a ten-year-old?",
    "What are the pros and cons of {}?", "Describe {} to someone who has never heard of it.",
    "What are common misconceptions about {}?", "Write a short poem about {}.",
]
PROSE_TEMPLATES = ["The history of {} is", "Many people are curious about {}. In this article,",
                   "Here is a short introduction to {}.", "When we think about {}, we"]
CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "computes the factorial of n",
    "merges two sorted lists", "counts the words in a text", "reads a CSV file and returns its rows",
    "finds the largest value in a list", "removes duplicates from a list while keeping the order",
    "converts Celsius to Fahrenheit", "returns the n-th Fibonacci number", "checks whether a string is a palindrome",
    "flattens a nested list", "sorts a list of dictionaries by a key", "returns the most common element of a list",
    "computes the average of a list of numbers", "validates an email address", "counts the vowels in a string",
    "returns the prime factors of a number", "transposes a matrix", "checks whether two strings are anagrams",
    "computes the greatest common divisor of two numbers", "converts a binary string to an integer",
    "finds the second largest number in a list", "capitalizes the first letter of every word",
    "implements binary search", "implements bubble sort", "computes the sum of the digits of a number",
    "removes the whitespace from a string", "groups words by their first letter", "returns the length of the longest word",
    "writes a list of strings to a file", "computes compound interest", "generates a random password",
    "checks whether a year is a leap year", "counts how often each character occurs", "rotates a list by k positions",
]
CODE_TEMPLATES = ["Write a Python function that {}.", "Show me Python code that {}, with a docstring."]
COUNTS = dict(prompt_tokens=48, new_tokens=96, chat_tokens=128)


def log(msg: str) -> None:
    print(f"[models] {msg}", flush=True)


def held_out(key: str) -> bool:
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % 5 == 0


def stdlib_files() -> tuple[list[Path], list[Path]]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.rglob("*.py")
                   if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts
                   and "idlelib" not in p.parts and 2_000 < p.stat().st_size < 400_000)
    held = [p for p in files if held_out(str(p.relative_to(lib)))]
    return [p for p in files if not held_out(str(p.relative_to(lib)))], held


def code_windows(files: list[Path], tok, n: int, seed: int) -> list[list[int]]:
    """``n`` windows of ``prompt_tokens`` tokens, each starting at a line start of a random file."""
    g = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        text = files[int(g.integers(len(files)))].read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines(keepends=True)
        start = int(g.integers(max(1, len(lines) - 40)))
        ids = tok.encode("".join(lines[start:start + 40]))
        if len(ids) >= COUNTS["prompt_tokens"]:
            out.append(ids[:COUNTS["prompt_tokens"]])
    return out


def prompt_sets(tok, windows: int) -> dict[str, dict[str, list]]:
    """Train and held-out prompts (token ids) with their kind and the new tokens they get."""
    chat = lambda q: tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]))  # noqa: E731
    sets: dict[str, dict[str, list]] = {"train": {}, "held_out": {}}
    for kind in ("chat", "prose", "code_chat"):
        for split in sets.values():
            split[kind] = []
    for topic in TOPICS:
        split = sets["held_out" if held_out(topic) else "train"]
        split["chat"] += [(t.format(topic), chat(t.format(topic))) for t in CHAT_TEMPLATES]
        split["prose"] += [(t.format(topic), tok.encode(t.format(topic))) for t in PROSE_TEMPLATES]
    for task in CODE_TASKS:
        split = sets["held_out" if held_out(task) else "train"]
        split["code_chat"] += [(t.format(task), chat(t.format(task))) for t in CODE_TEMPLATES]
    train_files, held_files = stdlib_files()
    sets["train"]["code"] = [(None, ids) for ids in code_windows(train_files, tok, windows, seed=1)]
    sets["held_out"]["code"] = [(None, ids) for ids in code_windows(held_files, tok, 64, seed=2)]
    return sets


def generate(engine, prompts: list[list[int]], limits: list[int], temperature: float, seed: int, chunk: int):
    """The LLM's continuations (greedy at temperature 0, else seeded samples) of ``prompts``."""
    from specinfer import SamplingParams

    out, start = [], time.monotonic()
    for i in range(0, len(prompts), chunk):
        params = [SamplingParams(max_tokens=m, temperature=temperature, seed=seed + i + j, ignore_eos=m == COUNTS["new_tokens"])
                  for j, m in enumerate(limits[i:i + chunk])]
        out += [r.token_ids for r in engine.generate(prompts[i:i + chunk], params, speculate=False)]
        log(f"  T={temperature}: {len(out)}/{len(prompts)} continuations ({time.monotonic() - start:.0f} s)")
    return out


def greedy_next(model, seqs: list[list[int]], batch: int) -> list[list[int]]:
    """A model's greedy next token after every prefix of each sequence (one causal forward each):
    the LLM's labels for the SSMs, and an SSM's predictions when its agreement is measured."""
    from specinfer.runner import ModelRunner, chain_batch

    runner = ModelRunner(model, batch, max(len(s) for s in seqs) + 1)
    labels = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch):
            part = seqs[i:i + batch]
            logits = runner.forward(list(range(len(part))), [0] * len(part), chain_batch(part))
            best = logits.argmax(-1).cpu()
            labels += [best[b, : len(s)].tolist() for b, s in enumerate(part)]
    return labels


def stage_data(llm: Path, device: str, repeats: int, windows: int) -> None:
    """Distillation data: the LLM's continuations of every train prompt (greedy, plus ``repeats``
    samples at temperature 0.8 for varied contexts), labelled with the LLM's greedy next token at
    every position; plus the SVD of the LLM's token embeddings."""
    from specinfer import SpecInferEngine

    batch = 256 if device.startswith("cuda") else 64
    engine = SpecInferEngine.from_pretrained(llm, device=device, max_batch_size=batch, max_context=SEQ)
    tok = engine.tokenizer
    sets = prompt_sets(tok, windows)
    prompts, limits, kinds = [], [], []
    for kind, items in sets["train"].items():
        prompts += [ids[: SEQ - COUNTS["chat_tokens"]] for _, ids in items]
        limits += [COUNTS["chat_tokens"] if "chat" in kind else COUNTS["new_tokens"]] * len(items)
        kinds += [kind] * len(items)
    log(f"{len(prompts)} train prompts on {device}: " + ", ".join(f"{k} {len(v)}" for k, v in sets["train"].items()))
    start = time.monotonic()
    seqs, starts = [], []
    for r in range(repeats + 1):
        pick = [i for i, k in enumerate(kinds) if r == 0 or k != "code"]  # samples of the chat/prose prompts
        outs = generate(engine, [prompts[i] for i in pick], [limits[i] for i in pick], 0.0 if r == 0 else 0.8,
                        seed=1000 * r, chunk=4 * batch)
        for i, out in zip(pick, outs):
            seqs.append((prompts[i] + out)[:SEQ + 1])
            starts.append(0 if kinds[i] in ("code", "prose") else len(prompts[i]) - 1)
    labels = greedy_next(engine.llm.model, seqs, 64)
    tokens = np.zeros((len(seqs), SEQ + 1), np.int32)
    targets = np.zeros((len(seqs), SEQ + 1), np.int32)
    mask = np.zeros((len(seqs), SEQ + 1), np.uint8)
    for i, (seq, lab, first) in enumerate(zip(seqs, labels, starts)):
        tokens[i, : len(seq)], targets[i, : len(seq)] = seq, lab
        mask[i, first: len(seq)] = 1  # predict from the prompt's last token (chat) or from the start (text)
    BUILD.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(BUILD / "distill.npz", tokens=tokens, targets=targets, mask=mask)
    emb = engine.llm.model.model.embed_tokens.weight.detach().float().cpu()
    u, s, _ = torch.linalg.svd(emb, full_matrices=False)
    width = max(a["hidden_size"] for a in ARCH.values())
    torch.save({"embed_svd": (u[:, :width] * s[:width]).half().contiguous()}, BUILD / "embed_svd.pt")
    held = {kind: [{"text": text, "ids": ids} for text, ids in items] for kind, items in sets["held_out"].items()}
    (BUILD / "held_out_prompts.json").write_text(json.dumps(held))
    info = {"sequences": len(seqs), "label_tokens": int(mask.sum()), "device": device, "repeats": repeats,
            "code_windows": windows, "seconds": round(time.monotonic() - start, 1)}
    (BUILD / "distill.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"distillation data: {info}")


def rows(data: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, the LLM's greedy targets and the loss mask, one sequence per row, in a seeded order."""
    order = torch.randperm(len(data["tokens"]), generator=torch.Generator().manual_seed(seed))
    as_long = lambda a: torch.from_numpy(a.astype(np.int64))[order]  # noqa: E731
    return as_long(data["tokens"]), as_long(data["targets"]), torch.from_numpy(data["mask"].astype(np.float32))[order]


def new_ssm(name: str, vocab: int, embed_svd: torch.Tensor, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, **ARCH[name])
    model = LlamaForCausalLM(cfg)
    width = cfg.hidden_size
    with torch.no_grad():  # the LLM's embedding geometry, scaled to this model's initial norm
        e = embed_svd[:, :width].float()
        model.model.embed_tokens.weight.copy_(e / e.std() * cfg.initializer_range * 5)
    return model


def train(name: str, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, embed_svd: torch.Tensor, steps: int,
          device: str, seed: int, batch: int, lr: float = 2e-3, resume: dict | None = None):
    """Weighted cross-entropy against the LLM's greedy next token (``y``, weights ``w``), AdamW, cosine
    decay; the LM head runs only where the weight is non-zero (it is most of an SSM's cost)."""
    model = new_ssm(name, int(embed_svd.shape[0]), embed_svd, seed)
    if resume is not None:  # continue an earlier run (e.g. a GPU run's weights, trained further here)
        model.load_state_dict(resume, strict=False)
        model.tie_weights()
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    g = torch.Generator().manual_seed(seed)
    start = time.monotonic()
    for step in range(steps):
        idx = torch.randint(len(x), (batch,), generator=g)
        xb, yb, wb = x[idx].to(device), y[idx].to(device), w[idx].to(device)
        keep = wb > 0
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            logits = model.lm_head(model.model(xb).last_hidden_state[keep])
        ce = torch.nn.functional.cross_entropy(logits.float(), yb[keep], reduction="none")
        loss = (ce * wb[keep]).sum() / wb.sum().clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            log(f"{name} step {step}/{steps} loss {loss.item():.3f} ({time.monotonic() - start:.0f} s)")
    return model.eval(), {"train_steps": steps, "train_rows": batch * steps, "train_seconds": round(time.monotonic() - start, 1)}


@torch.no_grad()
def predictions(model, x: torch.Tensor, device: str, batch: int = 64) -> torch.Tensor:
    out = []
    for i in range(0, len(x), batch):
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            out.append(model(x[i:i + batch].to(device)).logits.argmax(-1).cpu())
    return torch.cat(out)


def stage_train(device: str, steps: int, batch: int, output: Path, resume: bool = False) -> None:
    data = dict(np.load(BUILD / "distill.npz"))
    embed_svd = torch.load(BUILD / "embed_svd.pt")["embed_svd"]
    tokens, targets, mask = rows(data, seed=0)
    x, y, m = tokens[:, :SEQ], targets[:, :SEQ], mask[:, :SEQ]
    log(f"{len(x)} sequences ({int(m.sum()):,} LLM-labelled positions) on {device}")
    earlier = {n: torch.load(output / f"{n}.pt") for n in ARCH} if resume else {}
    start = {n: earlier[n]["state"] for n in earlier}
    ssm_a, info_a = train("ssm-a", x, y, m, embed_svd, steps, device, seed=1, batch=batch,
                          lr=1e-3 if resume else 2e-3, resume=start.get("ssm-a"))
    wrong = (predictions(ssm_a, x, device) != y).float() * m
    log(f"ssm-a misses {float(wrong.sum() / m.sum()):.1%} of the LLM's next tokens it was trained on")
    ssm_b, info_b = train("ssm-b", x, y, m * (1 + (BOOST - 1) * wrong), embed_svd, steps, device, seed=2, batch=batch, lr=1e-3 if resume else 2e-3,
                          resume=start.get("ssm-b"))
    output.mkdir(parents=True, exist_ok=True)
    for name, model, info in (("ssm-a", ssm_a, info_a), ("ssm-b", ssm_b, info_b)):
        torch.save({"config": model.config.to_dict(), "state": {k: v.to(torch.bfloat16).cpu() for k, v in model.state_dict().items() if k != "lm_head.weight"},
                    "info": earlier[name]["info"] + [{**info, "device": device}] if earlier else [{**info, "device": device}]},
                   output / f"{name}.pt")
    log(f"trained SSMs in {output}")


def stage_save(trained: Path, llm: Path) -> None:
    """Checkpoint folders (bf16 safetensors, the LLM's tokenizer) from the train stage's files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    for name in ARCH:
        blob = torch.load(trained / f"{name}.pt")
        model = LlamaForCausalLM(LlamaConfig.from_dict(blob["config"])).to(torch.bfloat16)
        model.load_state_dict(blob["state"], strict=False)  # lm_head is tied to the embedding
        model.tie_weights()
        folder = DEMO / name
        if folder.exists():
            shutil.rmtree(folder)
        model.save_pretrained(folder)
        (folder / "train.json").write_text(json.dumps(blob["info"], indent=2) + "\n")
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(llm / f, folder / f)
    log(f"saved {', '.join(ARCH)} in {DEMO}")


def latency_ms(model, tokens: int = 32) -> float:
    """Incremental decoding at batch size 1 in this engine, fp32: ms per generated token."""
    from specinfer import EngineConfig, SamplingParams, SpecInferEngine

    engine = SpecInferEngine(model, [], EngineConfig(max_batch_size=1, max_context=512))
    engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4, ignore_eos=True), speculate=False)
    start = time.perf_counter()
    engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=tokens, ignore_eos=True), speculate=False)
    return 1000 * (time.perf_counter() - start) / tokens


def stage_report(llm: Path) -> None:
    """Held-out agreement with the LLM's greedy next token, per-token costs, the held-out prompts."""
    from specinfer import SamplingParams, SpecInferEngine
    from specinfer.model import Transformer

    held = json.loads((BUILD / "held_out_prompts.json").read_text())
    engine = SpecInferEngine.from_pretrained(llm, max_batch_size=32, max_context=512)
    prompts = [p["ids"] for kind in held.values() for p in kind[:8]]
    results = engine.generate(prompts, SamplingParams(max_tokens=48), speculate=False)
    seqs = [p + r.token_ids for p, r in zip(prompts, results)]
    report = {"llm": {"parameters": sum(p.numel() for p in engine.llm.model.parameters()),
                      "ms_per_token_cpu_fp32": round(latency_ms(engine.llm.model), 2)},
              "held_out": {"prompts": len(prompts), "llm_tokens": sum(len(r.token_ids) for r in results)}}
    for name in ARCH:
        ssm = Transformer.from_pretrained(DEMO / name)
        hits = total = 0
        for p, seq, pred in zip(prompts, seqs, greedy_next(ssm, seqs, 32)):
            hits += sum(a == b for a, b in zip(pred[len(p) - 1:-1], seq[len(p):]))
            total += len(seq) - len(p)
        info = json.loads((DEMO / name / "train.json").read_text())
        report[name] = {"parameters": sum(p.numel() for p in ssm.parameters()), "training": info,
                        "held_out_top1_agreement": round(hits / total, 4),
                        "ms_per_token_cpu_fp32": round(latency_ms(ssm), 2)}
        log(f"{name}: {report[name]}")
    report["llm_over_ssm_cost"] = {n: round(report["llm"]["ms_per_token_cpu_fp32"] / report[n]["ms_per_token_cpu_fp32"], 1) for n in ARCH}
    (DEMO / "models.json").write_text(json.dumps(report, indent=2) + "\n")
    eval_prompts = {"chat": [p["text"] for p in held["chat"][::5][:4]] + [p["text"] for p in held["code_chat"][:2]],
                    "text": [p["text"] for p in held["prose"][:2]],
                    "code": [engine.tokenizer.decode(p["ids"]) for p in held["code"][:4]]}
    (DEMO / "prompts.json").write_text(json.dumps(eval_prompts, indent=2) + "\n")
    log(json.dumps(report, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["all", "data", "train", "save", "report"], default="all")
    ap.add_argument("--llm", type=Path, default=DEMO / "llm")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per SSM")
    ap.add_argument("--batch", type=int, default=16, help="sequences per optimizer step")
    ap.add_argument("--repeats", type=int, default=0, help="sampled continuations per chat/prose prompt, besides the greedy one")
    ap.add_argument("--code-windows", type=int, default=448, help="standard-library windows to continue")
    ap.add_argument("--trained", type=Path, default=BUILD / "trained", help="where the train stage writes")
    ap.add_argument("--force", action="store_true", help="redo stages whose outputs exist")
    ap.add_argument("--resume", action="store_true", help="train the SSMs in --trained further")
    args = ap.parse_args()
    begin = time.monotonic()
    if args.stage in ("all", "data") and (args.force or not (BUILD / "distill.npz").is_file()):
        stage_data(args.llm, args.device, args.repeats, args.code_windows)
    if args.stage in ("all", "train") and (args.force or args.resume or not (args.trained / "ssm-b.pt").is_file()):
        stage_train(args.device, args.steps, args.batch, args.trained, args.resume)
    if args.stage in ("all", "save"):
        stage_save(args.trained, args.llm)
    if args.stage in ("all", "report"):
        stage_report(args.llm)
    log(f"done in {time.monotonic() - begin:.0f} s")


if __name__ == "__main__":
    main()
