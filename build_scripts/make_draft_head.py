"""Train the demo LLM's draft head (``specinfer/proposers/head.py``) reproducibly, on the CPU.

Stages, cached under engines/demo/build/head/ (git-ignored), fixed seeds throughout:
1. ``data``: make_demo_models' train prompts (held-out topics, tasks and source files never used),
   plus chat requests about train code windows (explain, comment, rewrite, review, annotate, walk
   through) and more chat templates over the train topics; the LLM's greedy continuations
   (bfloat16, batched incremental decoding) and its final hidden states along them (one prefill each).
2. ``train``: the head learns, from the hidden state at position t and the tokens after it, to
   predict the LLM's tokens t+2 .. t+1+DEPTH (teacher-forced, unrolled DEPTH steps), each drafted
   state matched to the LLM's own at its position: the LLM's next-token distribution there over the
   head's vocabulary (the tokens the continuations used) as soft targets, and the hidden state itself.
3. ``report``: on the held-out prompts of engines/demo/prompts.json and workloads.json (never trained
   on), the head's top-1 agreement with the LLM per drafted depth, into engines/demo/head/config.json.

  python build_scripts/make_draft_head.py                 # every missing stage, for the demo LLM
  python build_scripts/make_draft_head.py --llm DIR --output HEAD --build CACHE   # another LLM's head
  python build_scripts/make_draft_head.py --stage train --steps 1600   # the demo head: 1200
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_demo_models as demo  # noqa: E402  (its prompt sets: one definition of train and held-out)

from benchmark import workload_prompts  # noqa: E402  (the held-out workloads, one definition)
from specinfer import SpecInferEngine  # noqa: E402
from specinfer.proposers.head import DraftHead  # noqa: E402
from specinfer.runner import ModelRunner, chain_batch  # noqa: E402

BUILD = demo.DEMO / "build" / "head"
OUTPUT = demo.DEMO / "head"
DEPTH = 3  # drafted tokens the training unrolls
WIDTH = 2  # the MLP's inner width, in multiples of the LLM's hidden size
MAX_VOCAB = 8192
REGRESSION = 1.0  # weight of the drafted states' distance from the LLM's hidden states against the soft targets' loss
NEW_TOKENS = 128
CODE_REQUESTS = ["Explain what this code does:\n\n{}", "Add comments to this code and return it:\n\n{}",
                 "Rewrite this code to be more readable:\n\n{}", "Is there a bug in this code?\n\n{}",
                 "Add type annotations to this code and return all of it:\n\n{}",
                 "Walk me through this code, quoting the lines you talk about:\n\n{}"]
MORE_CHAT = ["List some tips for {}.", "How do I get started with {}?", "Tell me about the history of {}.",
             "What should a beginner know about {}?", "Write a bulleted list of facts about {}.",
             "Compare {} with something similar.", "What questions do people often ask about {}?",
             "Give a one-paragraph summary of {}."]


def log(msg: str) -> None:
    print(f"[head] {msg}", flush=True)


def train_prompts(tok) -> list[list[int]]:
    """make_demo_models' train prompts and the extra chat requests, as token ids."""
    sets = demo.prompt_sets(tok, windows=256)["train"]
    prompts = [ids for items in sets.values() for _, ids in items]
    chat = lambda q: tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]))  # noqa: E731
    prompts += [chat(t.format(topic)) for topic in demo.TOPICS if not demo.held_out(topic) for t in MORE_CHAT]
    train_files, _ = demo.stdlib_files()
    code = demo.code_windows(train_files, tok, 2 * len(CODE_REQUESTS) * 40, seed=3)
    prompts += [chat(CODE_REQUESTS[i % len(CODE_REQUESTS)].format(tok.decode(ids))) for i, ids in enumerate(code)]
    return prompts


def held_out_prompts(tok) -> dict[str, list[list[int]]]:
    """The benchmark's workloads (open, code, grounded, multi-turn), never trained on."""
    return {k: v for k, v in workload_prompts(demo.DEMO, tok).items() if k != "warm"}


def continue_and_read(engine: SpecInferEngine, prompts: list[list[int]], chunk: int = 128) -> dict:
    """The LLM's greedy continuations of ``prompts`` and its final hidden states along them."""
    outs = demo.generate(engine, prompts, [NEW_TOKENS] * len(prompts), 0.0, seed=0, chunk=chunk)
    seqs = [p + out for p, out in zip(prompts, outs)]
    model = engine.llm.model
    runner = ModelRunner(model, 32, max(len(s) for s in seqs) + 2, "sdpa", False)
    hidden = []
    for i in range(0, len(seqs), 32):
        part = seqs[i:i + 32]
        _, h = runner.forward(list(range(len(part))), [0] * len(part), chain_batch(part), hidden=True)
        hidden += [h[b, : len(s)].to(torch.bfloat16).clone() for b, s in enumerate(part)]
    return {"seqs": seqs, "starts": [len(p) - 1 for p in prompts], "hidden": hidden}


def stage_data(llm: Path, build: Path) -> None:
    engine = SpecInferEngine.from_pretrained(llm, dtype="bfloat16", max_batch_size=128, max_context=640,
                                             batch_invariant=False)
    tok = engine.tokenizer
    build.mkdir(parents=True, exist_ok=True)
    prompts = [p[-448:] for p in train_prompts(tok)]
    log(f"{len(prompts)} train prompts")
    torch.save(continue_and_read(engine, prompts), build / "train.pt")
    held = held_out_prompts(tok)
    torch.save({kind: continue_and_read(engine, ps) for kind, ps in held.items()}, build / "held_out.pt")


def windows(data: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every output position t: the index of the LLM's hidden state there in ``flat`` (all of
    ``data``'s hidden states, concatenated), the tokens t+1 .. t+1+DEPTH (-1 past the end) and
    ``flat`` itself; the states at t+1 .. t+DEPTH, which the head's unrolled states stand for, are
    the next rows (valid where the token after them is)."""
    index, xs, offset = [], [], 0
    for seq, first, h in zip(data["seqs"], data["starts"], data["hidden"]):
        s, n = torch.tensor(seq), len(seq)
        t = torch.arange(first, n - 2)
        if len(t):
            idx = t[:, None] + torch.arange(1, DEPTH + 2)
            xs.append(torch.where(idx < n, s[idx.clamp(max=n - 1)], -1))
            index.append(offset + t)
        offset += len(h)
    return torch.cat(index), torch.cat(xs), torch.cat(data["hidden"])


def target_states(flat: torch.Tensor, at: torch.Tensor, j: int) -> torch.Tensor:
    """The LLM's hidden states that the head's states after ``j + 1`` drafted tokens from positions
    ``at`` stand for: one position on per token (clamped at the end; ``windows``' -1 tokens mask those)."""
    return flat[(at + j + 1).clamp(max=len(flat) - 1)]


def unrolled(head: DraftHead, embed: torch.Tensor, rows: torch.Tensor, vocab_index: torch.Tensor,
             flat: torch.Tensor, at: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """The loss over the DEPTH drafted tokens, and top-1 agreement per depth. Each drafted state
    learns the LLM's next-token distribution at its position (soft targets: the LLM's output layer
    over the head's vocabulary, read from the LLM's hidden state there; they rank the runner-up
    tokens the tree's branches draft, which the greedy token alone does not) and that hidden state
    itself (``REGRESSION`` x smooth L1: the next level starts from it)."""
    state, losses, agree = flat[at].float(), [], []
    for j in range(DEPTH):
        state = head.step(state, embed[x[:, j].clamp(min=0)].float())
        seen = x[:, j + 1] >= 0
        label = torch.where(seen, vocab_index[x[:, j + 1].clamp(min=0)], -1)
        logits = (state.to(rows.dtype) @ rows.T).float()
        target = target_states(flat, at, j)
        with torch.no_grad():
            teacher = torch.softmax((target @ rows.T).float(), dim=-1)
        soft = -(teacher * torch.log_softmax(logits, dim=-1)).sum(-1)
        losses.append(soft[seen].mean() + REGRESSION * F.smooth_l1_loss(state[seen], target[seen].float()))
        agree.append(float((logits.argmax(-1) == label)[seen].float().mean()))
    return torch.stack(losses).mean(), agree


def stage_train(llm: Path, build: Path, output: Path, steps: int, batch: int) -> None:
    from specinfer.model import Transformer

    model = Transformer.from_pretrained(llm, dtype=torch.bfloat16)
    embed, out_layer = model.model.embed_tokens.weight.detach(), model.lm_head.weight.detach()
    data = torch.load(build / "train.pt")
    counts = torch.bincount(torch.tensor([t for s, f in zip(data["seqs"], data["starts"]) for t in s[f + 1:]]),
                            minlength=embed.shape[0])
    vocab = torch.argsort(counts, descending=True, stable=True)[: min(MAX_VOCAB, int((counts > 0).sum()))]
    vocab_index = torch.full((embed.shape[0],), -1, dtype=torch.long)
    vocab_index[vocab] = torch.arange(len(vocab))
    at, x, flat = windows(data)
    log(f"{len(at):,} positions, vocabulary of {len(vocab)} tokens")
    torch.manual_seed(0)
    head = DraftHead(embed.shape[1], WIDTH * embed.shape[1], vocab)
    torch.nn.init.zeros_(head.down.weight)  # starts as the LLM's own reading of the state
    torch.nn.init.zeros_(head.down.bias)
    rows = out_layer[vocab]  # the output layer's rows the head reads
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.0)
    g, start = torch.Generator().manual_seed(0), time.monotonic()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        i = torch.randint(len(at), (batch,), generator=g)
        loss, agree = unrolled(head, embed, rows, vocab_index, flat, at[i], x[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step}/{steps} loss {loss.item():.3f} agreement {[round(a, 3) for a in agree]} "
                f"({time.monotonic() - start:.0f} s)")
    with torch.no_grad():
        held = torch.load(build / "held_out.pt")
        report = {}
        for kind, d in held.items():
            at_held, x_held, flat_held = windows(d)
            report[kind] = [round(a, 3) for a in unrolled(head, embed, rows, vocab_index, flat_held, at_held, x_held)[1]]
    log(f"held-out top-1 agreement per drafted depth: {report}")
    head.to(torch.bfloat16).save(output, train_steps=steps, train_rows=steps * batch,
                                 train_seconds=round(time.monotonic() - start, 1), positions=len(at),
                                 held_out_agreement_by_depth=report)
    log(f"saved {output}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["all", "data", "train"], default="all")
    ap.add_argument("--llm", type=Path, default=demo.DEMO / "llm", help="the LLM the head drafts for (a folder with tokenizer.json)")
    ap.add_argument("--output", type=Path, default=OUTPUT, help="the head's folder")
    ap.add_argument("--build", type=Path, default=BUILD, help="where the data stage caches its files (one per LLM)")
    ap.add_argument("--steps", type=int, default=1200, help="optimizer steps (the demo head's: 1200)")
    ap.add_argument("--batch", type=int, default=2048, help="positions per optimizer step")
    ap.add_argument("--force", action="store_true", help="redo stages whose outputs exist")
    args = ap.parse_args()
    torch.set_grad_enabled(True)
    if args.stage in ("all", "data") and (args.force or not (args.build / "held_out.pt").is_file()):
        stage_data(args.llm, args.build)
    if args.stage in ("all", "train"):
        stage_train(args.llm, args.build, args.output, args.steps, args.batch)


if __name__ == "__main__":
    main()
