"""Target distributions (temperature, top-k, top-p) and draft draws."""
from __future__ import annotations

import pytest
import torch

from specinfer import SamplingParams
from specinfer.sampling import draw_children, first_max, make_generator, target_probs

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0], [0.0, 3.0, 0.0, 1.0, 0.0]])


def test_temperature_scales_logits():
    p = target_probs(LOGITS, SamplingParams(temperature=0.5))
    torch.testing.assert_close(p, torch.softmax(LOGITS / 0.5, dim=-1))


def test_top_k_keeps_the_k_largest_per_row():
    p = target_probs(LOGITS, SamplingParams(temperature=1.0, top_k=2))
    assert (p[0] > 0).tolist() == [True, True, False, False, False]
    assert (p[1] > 0).tolist() == [False, True, False, True, False]
    torch.testing.assert_close(p[0, :2], torch.softmax(LOGITS[0, :2], dim=-1))


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    full = torch.softmax(LOGITS[0], dim=-1)  # 0.55, 0.20, 0.12, 0.07, 0.03 (about)
    p = target_probs(LOGITS[0], SamplingParams(temperature=1.0, top_p=0.7))
    assert (p > 0).tolist() == [True, True, False, False, False]
    torch.testing.assert_close(p[:2], full[:2] / full[:2].sum())
    assert (target_probs(LOGITS[0], SamplingParams(temperature=1.0, top_p=0.5)) > 0).sum() == 1


def test_top_k_then_top_p_compose():
    # top-3 renormalised is 0.63, 0.23, 0.14: top-p 0.8 then keeps two tokens; top-p alone keeps three.
    both = target_probs(LOGITS[0], SamplingParams(temperature=1.0, top_k=3, top_p=0.8))
    alone = target_probs(LOGITS[0], SamplingParams(temperature=1.0, top_p=0.8))
    assert (both > 0).tolist() == [True, True, False, False, False]
    assert (alone > 0).tolist() == [True, True, True, False, False]


def test_draws_with_and_without_replacement():
    probs = torch.tensor([0.7, 0.3, 0.0, 0.0])
    g = make_generator(0)
    assert sorted(draw_children(probs, 5, replacement=False, generator=g)) == [0, 1]  # only two non-zero
    draws = draw_children(probs, 200, replacement=True, generator=g)
    assert set(draws) <= {0, 1} and 100 < draws.count(0) < 180


def test_without_replacement_draw_order_is_sequential():
    # First draw ~ q; P(first = 0) = 0.7 exactly, which a sorted or shuffled set would not give.
    probs = torch.tensor([0.7, 0.2, 0.1])
    g = make_generator(1)
    firsts = [draw_children(probs, 3, replacement=False, generator=g)[0] for _ in range(3000)]
    assert abs(firsts.count(0) / 3000 - 0.7) < 0.04


def test_same_seed_same_draws():
    probs = torch.softmax(torch.randn(50), dim=-1)
    a = draw_children(probs, 8, True, make_generator(7))
    b = draw_children(probs, 8, True, make_generator(7))
    assert a == b


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_first_max_is_argmax_with_its_ties(dtype):
    """Greedy choices go through ``first_max`` (faster than ``argmax`` on CPUs): the same index, the
    first of equal maxima, on logits rounded so that ties are everywhere."""
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(16, 9, 4099, generator=g)).round().to(dtype)
    x[0, 0, [5, 700, 4098]] = 50  # a tie of three at the top
    assert torch.equal(first_max(x), torch.argmax(x, dim=-1))
    assert int(first_max(x)[0, 0]) == 5
