"""benchmarks/gradient_masking.py: its gradient statistics and its attacks on tiny models."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import REPO, NearUniform
from torch import nn

sys.path.insert(0, str(REPO / "benchmarks"))
import gradient_masking  # noqa: E402


class Rounded(nn.Module):
    """A linear classifier on inputs rounded to quarters: its input gradient is zero everywhere."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.round(x * 4) / 4)


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))


def test_gradient_stats_sees_a_zero_gradient_only_where_there_is_one():
    x, y = torch.rand(16, 3, 4, 4), torch.randint(0, 10, (16,))
    linear = _linear()
    _, zero = gradient_masking.gradient_stats(linear, x, y)
    assert zero == 0.0
    _, zero = gradient_masking.gradient_stats(Rounded(linear), x, y)
    assert zero == 1.0


def test_every_attack_stays_in_its_radius_and_only_transfer_breaks_a_model_without_a_gradient():
    x = torch.rand(32, 3, 4, 4)
    linear = _linear()
    with torch.no_grad():
        y = linear(x).argmax(1)  # every row correct on the linear model
    eps = 8 / 255
    table = gradient_masking.attacks(eps, seed=0, apgd_steps=5, num_classes=10)
    for name, attack in table.items():
        adv = attack(linear, x, y)
        radius = 4 * eps if "4x" in name else 2 * eps if "2x" in name else eps
        assert adv.shape == x.shape and 0 <= adv.min() and adv.max() <= 1, name
        assert (adv - x).abs().max() <= radius + 1e-6, name
    # White-box PGD on the rounded model finds no direction; the linear model's examples, transferred, do.
    rounded = Rounded(linear)
    y_rounded = rounded(x).argmax(1)
    pgd20 = table["PGD-20, CE, step 0.01 (the records' attack)"]
    white_box = gradient_masking.correct(rounded, pgd20(rounded, x, y_rounded), y_rounded, size=8)
    transferred = gradient_masking.correct(rounded, pgd20(linear, x, y_rounded), y_rounded, size=8)
    assert transferred.float().mean() < white_box.float().mean()


def test_the_margin_search_finds_the_minimum_perturbation_that_the_cross_entropy_search_overstates():
    # NearUniform flips to class 1 past 0.05 along its first pixel, the way the margin's gradient goes; the
    # cross-entropy's goes the other way, where nothing flips before 0.5. Grid: 0.0075 steps up to 0.12.
    x, y = torch.full((6, 1, 1, 2), 0.5), torch.zeros(6, dtype=torch.long)
    medians = gradient_masking.median_minimum_eps(NearUniform(), x, y, eps=0.03, size=4)
    assert medians["ce"] == pytest.approx(0.12)  # censored at 4x eps
    assert medians["margin"] == pytest.approx(0.0525)  # the first grid radius past 0.05
