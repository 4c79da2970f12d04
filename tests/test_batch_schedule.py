"""Warmup and seeded_generator as pure functions of the epoch, the batch and the seed."""

from __future__ import annotations

import pytest
import torch

from lightning_advsel import AttackConfig
from lightning_advsel.batch_schedule import Warmup, seeded_generator
from lightning_advsel.step import StepSettings

BASE = StepSettings(recipe="selective", p_up=1.0, attack_frac=0.25, train_attack=AttackConfig(eps=0.1, alpha=0.02))


def test_the_attack_warmup_attacks_every_row_or_random_rows_during_its_epochs():
    assert Warmup(2, "all").settings(BASE, 1, 0, 10).attack_frac == 1.0
    random = Warmup(2, "random").settings(BASE, 1, 0, 10)
    assert (random.attack_score, random.attack_frac) == ("random", 0.25)
    assert Warmup(2, "all").settings(BASE, 2, 0, 10) is BASE


def test_the_radius_ramp_rises_batch_by_batch_and_scales_the_step_with_it():
    ramp = Warmup(eps_epochs=2.0)
    first, middle = ramp.settings(BASE, 0, 0, 10).train_attack, ramp.settings(BASE, 0, 9, 10).train_attack
    assert first.eps == pytest.approx(0.1 * 1 / 20) and first.alpha == pytest.approx(0.02 * 1 / 20)
    assert middle.eps == pytest.approx(0.05)
    assert ramp.settings(BASE, 2, 0, 10).train_attack.eps == pytest.approx(0.1)
    assert ramp.eps_factor(0, 3, float("inf")) == pytest.approx(0.5)  # a loader without a length: whole epochs


@pytest.mark.parametrize(("kwargs", "message"), [({"attack_epochs": -1}, r"`attack_warmup_epochs` must be an integer"),
                                                 ({"attack_pick": "some"}, r"`attack_warmup` must be one of"),
                                                 ({"eps_epochs": -0.5}, r"`eps_warmup_epochs` must be a finite")])
def test_bad_warmups_are_refused_by_the_modules_argument_names(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Warmup(**kwargs)


def test_a_batches_generator_depends_on_the_seed_the_offset_and_the_rank_only():
    def draw(seed: int, offset: int, rank: int) -> torch.Tensor:
        return torch.rand(3, generator=seeded_generator(seed, offset, rank, torch.device("cpu")))

    assert torch.equal(draw(0, 5, 0), draw(0, 5, 0))
    assert not torch.equal(draw(0, 5, 0), draw(0, 6, 0)) and not torch.equal(draw(0, 5, 0), draw(0, 5, 1))
