"""Position-keyed Gumbel noise: the same vector for (seed, output position) in any batch, on any device
(to the last bits of float64's ``log``, which CPU and CUDA libraries round differently).

A request samples output position k as the argmax of its target scores plus ``gumbel(seed, k)``
(``sampling.gumbel_choice``). The noise comes from Philox4x32-10 (Salmon et al., SC 2011; the
generator of cuRAND and of Random123) with the seed as its 64-bit key and the counter
``(vocabulary block, position, 0, 0)``: each counter gives four 32-bit words, i.e. the uniforms of
four consecutive token ids. Counter-based means any position's vector is computed directly, without
stepping a stream, so a tree's nodes at any depth, a batch of requests and incremental decoding all
read the same values. The rounds use int64 tensor ops on 32-bit words: a 32 x 32-bit product's 64
bits are those of the int64 product, which wraps around two's complement on CPUs and GPUs alike
(``tests/test_noise.py`` checks the published Philox vectors and a plain-integer computation).
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # key increments (golden ratio, sqrt(3) - 1)
ROUNDS = 10


def mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * m`` for 32-bit ``a`` (int64 tensor) and constant ``m``."""
    product = a * m  # the low 64 bits of the product, as int64
    return (product >> 32) & MASK32, product & MASK32


def philox(counter: tuple[torch.Tensor, ...], key: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on broadcastable int64 tensors holding 32-bit words; four 32-bit words out."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(ROUNDS):
        if r:
            k0, k1 = (k0 + PHILOX_W[0]) & MASK32, (k1 + PHILOX_W[1]) & MASK32
        hi0, lo0 = mulhilo(c0, PHILOX_M[0])
        hi1, lo1 = mulhilo(c2, PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def seed_key(seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Philox key of 64-bit seeds given as int64 (two's complement above 2**63)."""
    return seeds & MASK32, (seeds >> 32) & MASK32


def as_int64(seed: int) -> int:
    """A seed in [0, 2**64) as the int64 with the same bits."""
    return seed - 2**64 if seed >= 2**63 else seed


def uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniforms in (0, 1) ``[*positions.shape, vocab]`` (float64, each a 32-bit word plus one half over
    2**32: exact, so bit-identical on any device) for ``seeds [B]`` (int64, see ``as_int64``) and
    output ``positions [B, P]``; a value depends only on (seed, position, token)."""
    device = positions.device
    k0, k1 = seed_key(seeds.to(device).view(-1, 1, 1))
    blocks = torch.arange(-(-vocab // 4), device=device, dtype=torch.long).view(1, 1, -1)
    zero = torch.zeros((), dtype=torch.long, device=device)
    words = philox((blocks, positions.long()[..., None], zero, zero), (k0, k1))
    noise = torch.empty(*words[0].shape, 4, dtype=torch.float64, device=device)
    for i, word in enumerate(words):
        noise[..., i] = word
    return noise.flatten(-2)[..., :vocab].add_(0.5).mul_(2.0**-32)


def gumbel(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log(u))`` of ``uniform``'s values (float64). On one device a value
    is the same in any batch; across devices it may differ in the last bits, where the CPU's and
    CUDA's float64 ``log`` round differently (an H200: 43 of 196,608 values, at most 4.8e-14 relative)."""
    return uniform(seeds, positions, vocab).log_().neg_().log_().neg_()
