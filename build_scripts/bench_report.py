"""Markdown table and PNG plots from the benchmark's results.json."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def write_markdown(report: dict, path: Path) -> None:
    engine = report["engine"]
    inc = {r["batch"]: r for r in engine if r["name"].startswith("incremental")}
    m = report["machine"]
    lines = [f"Machine: {m['arch']}, {m['threads']} threads, {m['device']}, {m['dtype']}, torch {m['torch']}; "
             f"{'quick' if report['quick'] else 'full'} run, {report['seconds']:.0f} s.", "",
             "| configuration | batch | tokens / LLM step | acceptance | ms / token | speedup | overhead ms / step | identical |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in engine:
        speedup = inc[r["batch"]]["ms_per_token"] / r["ms_per_token"]
        same = "" if r["identical_to_incremental"] is None else ("yes" if r["identical_to_incremental"] else "NO")
        lines.append(f"| {r['name']} | {r['batch']} | {r['tokens_per_step']:.2f} | {r['acceptance_rate']:.1%} | "
                     f"{r['ms_per_token']:.2f} | {speedup:.2f}x | {r['overhead_ms_per_step']:.2f} | {same} |")
    for r in report["hf"]:
        lines.append(f"| {r['name']} | 1 | | | {r['ms_per_token']:.2f} | {inc[1]['ms_per_token'] / r['ms_per_token']:.2f}x"
                     f" | | {'yes' if r['identical_to_incremental'] else 'NO'} |")
    if report["triton"]:
        lines += ["", "| Triton model | concurrency | requests/s | output tokens/s | tokens / LLM step | p50 ms | p99 ms |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in report["triton"]:
            lines.append(f"| {r['model']} | {r['concurrency']} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | "
                         f"{r['tokens_per_llm_step']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |")
    if report.get("genai_perf"):
        lines += ["", "| genai-perf model | concurrency | TTFT ms | inter-token ms | output tokens/s |",
                  "| --- | --- | --- | --- | --- |"]
        for r in report["genai_perf"]:
            lines.append(f"| {r['model']} | {r['concurrency']} | {r['ttft_ms']:.1f} | {r['itl_ms']:.1f} | "
                         f"{r['output_tok_s']:.1f} |")
    path.write_text("\n".join(lines) + "\n")


def write_plots(report: dict, out: Path) -> None:
    engine = report["engine"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    greedy = [r for r in engine if r["name"].startswith("width")]
    axes[0].plot([r["expansion"][2] for r in greedy], [r["tokens_per_step"] for r in greedy], "o-", label="greedy")
    for label in ("MSS with replacement", "MSS without replacement", "naive sampling"):
        rows = [r for r in engine if r["name"].startswith(label)]
        if rows:
            axes[0].plot([r["expansion"][2] for r in rows], [r["tokens_per_step"] for r in rows], "o--", label=label)
    axes[0].set(title="tokens per LLM step vs tree width <1,1,w,1,1,1,1,1>", xlabel="w", ylabel="tokens / step")
    axes[0].legend(fontsize=8)
    for r in engine:
        if r["name"].startswith(("chain depth 8 (b)", "paper tree (b)", "paper tree (a+b)")) and r["batch"] == 1:
            axes[1].plot(range(1, len(r["acceptance_by_depth"]) + 1), r["acceptance_by_depth"], "o-", label=r["name"])
    axes[1].set(title="steps whose accepted path reaches depth d", xlabel="depth d", ylabel="fraction of steps")
    axes[1].legend(fontsize=8)
    inc = {r["batch"]: r["ms_per_token"] for r in engine if r["name"].startswith("incremental")}
    rows = [r for r in engine if r["temperature"] == 0 and r["ssms"]]
    axes[2].barh([f"{r['name']}" if r["batch"] == 1 else r["name"] for r in rows],
                 [inc[r["batch"]] / r["ms_per_token"] for r in rows])
    axes[2].axvline(1.0, color="k", lw=0.8)
    axes[2].set(title="speedup over incremental (greedy)", xlabel="x")
    axes[2].tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "engine.png", dpi=110)
    plt.close(fig)
    write_load_plot(report, out)
    if report["triton"]:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for model in ("specinfer", "incremental"):
            rows = [r for r in report["triton"] if r["model"] == model]
            c = [r["concurrency"] for r in rows]
            axes[0].plot(c, [r["output_tokens_per_s"] for r in rows], "o-", label=model)
            axes[1].plot(c, [r["p50_ms"] for r in rows], "o-", label=f"{model} p50")
            axes[1].plot(c, [r["p99_ms"] for r in rows], "x--", label=f"{model} p99")
        axes[0].set(title="Triton: output tokens/s", xlabel="concurrency", xscale="log", xticks=c, xticklabels=c)
        axes[1].set(title="Triton: latency (ms)", xlabel="concurrency", xscale="log", xticks=c, xticklabels=c)
        axes[0].legend()
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "triton.png", dpi=110)
        plt.close(fig)


def write_load_plot(report: dict, out: Path) -> None:
    """Speedup over incremental decoding against load: engine batch size, Triton concurrency."""
    engine = report["engine"]
    inc = {r["batch"]: r["ms_per_token"] for r in engine if r["name"].startswith("incremental")}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label in ("adaptive", "served", "chain depth 2 (a)", "paper tree (a+b)"):
        rows = sorted((r for r in engine if r["name"].startswith(label) and r["temperature"] == 0),
                      key=lambda r: r["batch"])
        by_batch = {r["batch"]: inc[r["batch"]] / r["ms_per_token"] for r in rows}
        if len(by_batch) > 1:
            axes[0].plot(list(by_batch), list(by_batch.values()), "o-", label=label)
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set(title="engine: speedup over incremental", xlabel="batch size", ylabel="x", xscale="log")
    axes[0].legend(fontsize=8)
    triton = report["triton"]
    if triton:
        base = {r["concurrency"]: r["output_tokens_per_s"] for r in triton if r["model"] == "incremental"}
        rows = [r for r in triton if r["model"] == "specinfer"]
        axes[1].plot([r["concurrency"] for r in rows], [r["output_tokens_per_s"] / base[r["concurrency"]] for r in rows],
                     "o-", label="specinfer (adaptive) / incremental")
        axes[1].axhline(1.0, color="k", lw=0.8)
        axes[1].set(title="Triton: output tokens/s ratio", xlabel="concurrency", xscale="log")
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "load.png", dpi=110)
    plt.close(fig)
