"""Position-keyed Gumbel noise: Philox4x32-10 as published, values fixed by (seed, position, token) alone."""
from __future__ import annotations

import math

import pytest
import torch

from specinfer.noise import as_int64, gumbel, philox, uniform

M32 = 0xFFFFFFFF


def philox_scalar(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """Philox4x32-10 in plain Python integers (Salmon et al., Random123's ``philox4x32``)."""
    c, (k0, k1) = list(counter), key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & M32, (p0 >> 32) ^ c[3] ^ k1, p0 & M32]
    return tuple(c)


def gumbel_scalar(seed: int, position: int, token: int) -> float:
    word = philox_scalar((token // 4, position, 0, 0), (seed & M32, seed >> 32))[token % 4]
    return -math.log(-math.log((word + 0.5) / 2**32))


# Random123's known-answer vectors for philox4x32_R(10, counter, key).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32,) * 4, (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_philox_matches_the_published_vectors(counter, key, expected):
    assert philox_scalar(counter, key) == expected
    words = philox(tuple(torch.tensor(c) for c in counter), tuple(torch.tensor(k) for k in key))
    assert tuple(int(w) for w in words) == expected


def test_values_depend_only_on_seed_position_and_token():
    seeds = [0, 7, 2**32 + 5, 2**64 - 1]
    positions = torch.tensor([[0, 1, 2], [5, 0, 9], [3, 3, 40], [1000, 0, 1]])
    vocab = 11  # not a multiple of four: the last block is cut
    noise = gumbel(torch.tensor([as_int64(s) for s in seeds]), positions, vocab)
    assert noise.shape == (4, 3, vocab) and noise.dtype == torch.float64
    for b, seed in enumerate(seeds):
        for j, pos in enumerate(positions[b].tolist()):
            direct = torch.tensor([gumbel_scalar(seed, pos, t) for t in range(vocab)], dtype=torch.float64)
            torch.testing.assert_close(noise[b, j], direct, rtol=0, atol=1e-12)
    # the same (seed, position) in another batch, at another place, gives the same vector
    alone = gumbel(torch.tensor([as_int64(2**64 - 1)]), torch.tensor([[0, 1000]]), vocab)
    assert torch.equal(alone[0, 1], noise[3, 0])
    assert torch.equal(noise[2, 0], noise[2, 1])  # position 3 twice
    assert not torch.equal(noise[0, 0], noise[1, 1])  # seed 0 and seed 7 at position 0 differ


def test_noise_is_standard_gumbel():
    noise = gumbel(torch.arange(64), torch.arange(32).expand(64, 32), 500).flatten()
    assert abs(float(noise.mean()) - 0.5772) < 0.01  # Euler-Mascheroni constant
    assert abs(float(noise.var()) - math.pi**2 / 6) < 0.03


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_uniforms_bit_for_bit_and_gumbel_to_the_last_bits():
    """The Philox words and the uniforms made of them are exact on both devices; ``log`` is rounded by
    each device's library (an H200 differed from this CPU in 43 of 196,608 values, by <= 4.8e-14)."""
    seeds, positions = torch.tensor([1, as_int64(2**64 - 1)]), torch.tensor([[0, 7], [3, 123456]])
    assert torch.equal(uniform(seeds.cuda(), positions.cuda(), 49152).cpu(), uniform(seeds, positions, 49152))
    cpu = gumbel(seeds, positions, 49152)
    cuda = gumbel(seeds.cuda(), positions.cuda(), 49152).cpu()
    torch.testing.assert_close(cuda, cpu, rtol=1e-12, atol=0)
