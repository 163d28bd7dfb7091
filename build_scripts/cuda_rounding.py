"""Which of a CUDA device's kernels give a row bits that depend on what else shares the call.

    PYTHONPATH=backend python3 build_scripts/cuda_rounding.py     # on a machine with a CUDA GPU

For linear layers of several shapes and the reductions of the per-token layers (RMSNorm, softmax),
in bfloat16 and float32: row 0's result for calls of M = 1..256 rows, labelled by distinct value
(``1:A 2-16:B`` = one rounding class for M = 1, another for 2-16), and whether calls of a fixed M
give a row the same bits at any position beside any other rows (what ``batch_invariance.DEVICE_ROWS``
relies on). Then the engine on the tests' random models: speculative against plain decoding,
requests whose tokens are equal, per dtype and attention. Measured, never assumed: see
``model/batch_invariance.py``.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "backend"), str(ROOT / "tests")]
from specinfer.model.transformer import RMSNorm  # noqa: E402

LINEAR = [(128, 64), (576, 576), (1536, 576), (576, 1536), (49152, 576), (4096, 4096), (11008, 4096)]
NORM = [64, 256, 576, 2048, 4096]
M = 256


def classes(f, x: torch.Tensor) -> str:
    """Row 0 of ``f(x[:m])`` for m = 1..len(x), as runs of labels by distinct value."""
    seen, labels = [], []
    for m in range(1, len(x) + 1):
        r0 = f(x[:m])[0]
        i = next((i for i, s in enumerate(seen) if torch.equal(s, r0)), None)
        if i is None:
            seen.append(r0)
            i = len(seen) - 1
        labels.append(chr(65 + i) if i < 26 else "+")
    out, start = [], 0
    for m in range(1, len(labels) + 1):
        if m == len(labels) or labels[m] != labels[start]:
            out.append(f"{start + 1}-{m}:{labels[start]}" if m - start > 1 else f"{m}:{labels[start]}")
            start = m
    return " ".join(out)


def fixed(f, x: torch.Tensor, p: int) -> bool:
    """Calls of exactly ``p`` rows: a row alone (zeros after it) equals it among others, at two offsets."""
    idx = range(0, len(x), 17)
    alone = torch.stack([f(torch.cat([x[i:i + 1], x.new_zeros(p - 1, x.shape[1])]))[0] for i in idx])
    full = torch.cat([f(x[j:j + p]) for j in range(0, len(x), p)])[list(idx)]
    rolled = torch.cat([f(x.roll(5, 0)[j:j + p]) for j in range(0, len(x), p)]).roll(-5, 0)[list(idx)]
    return torch.equal(alone, full) and torch.equal(alone, rolled)


def main() -> None:
    torch.manual_seed(0)
    dev = "cuda"
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype)[6:]
        for n, k in LINEAR:
            w = torch.randn(n, k, device=dev).to(dtype)
            x = torch.randn(M, k, device=dev).to(dtype)
            f = lambda t: F.linear(t, w)  # noqa: E731
            print(f"{name:9} linear {n}x{k}: {classes(f, x)} | fixed 64 rows: {fixed(f, x, 64)}")
        for h in NORM:
            norm = RMSNorm(h, 1e-5).to(dev)
            norm.invariant = False  # the kernel's own classes, not the model's padded calls
            norm.weight.data = torch.rand(h, device=dev) + 0.5
            x = torch.randn(M, h, device=dev).to(dtype)
            print(f"{name:9} rmsnorm {h}: {classes(norm, x)} | fixed 64 rows: {fixed(norm, x, 64)}")
        for v in (512, 49152):
            x = (4 * torch.randn(M, v, device=dev)).to(dtype).float()
            f = lambda t: torch.log_softmax(t, -1)  # noqa: E731
            print(f"{name:9} log_softmax {v}: {classes(f, x)}")
    from conftest import make_llama, prompts
    from specinfer import SamplingParams, SpecInferEngine, TreeConfig
    root = Path(tempfile.mkdtemp())
    llm = make_llama(root / "llm", seed=0)
    close = make_llama(root / "close", seed=1, noise_from=llm, noise=0.25)
    batch = prompts(24, seed=31)
    params = [SamplingParams(max_tokens=5 + (i * 5) % 13, ignore_eos=True) for i in range(len(batch))]
    for dtype in ("bfloat16", "float32"):
        for attention, kw in (("triton", {}), ("triton", {"cuda_graphs": False}), ("sdpa", {}),
                              ("triton", {"offload": "cpu"})):
            for rows in (1, 8):
                e = SpecInferEngine.from_pretrained(llm, [close], device=dev, dtype=dtype, max_batch_size=rows,
                                                    attention=attention, tree=TreeConfig(expansion=(1, 1, 3, 1)), **kw)
                a = [r.token_ids for r in e.generate(batch, params, speculate=False)]
                b = [r.token_ids for r in e.generate(batch, params)]
                print(f"engine {dtype} {attention} {kw} batch {rows}: {sum(x == y for x, y in zip(a, b))}/{len(batch)} "
                      "requests equal")


if __name__ == "__main__":
    main()
