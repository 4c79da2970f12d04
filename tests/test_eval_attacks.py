"""The attack arguments read from plain data, the logits under attack, and the inputs mapped to pixels."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyNet, tiny_batch

from lightning_advsel import AttackConfig
from lightning_advsel.batch_schedule import seeded_generator
from lightning_advsel.eval_attacks import as_attack, as_robust_attack, attacked_logits, resolve_eval_attack
from lightning_advsel.pixels import as_normalization, pixel_model, read_pixels


def test_attacks_are_read_from_dicts_and_bad_keys_or_types_are_named():
    assert as_attack("train_attack", {"eps": 0.2}) == AttackConfig(eps=0.2)
    with pytest.raises(ValueError, match=r"`train_attack` has an unknown key"):
        as_attack("train_attack", {"radius": 0.2})
    with pytest.raises(ValueError, match=r"`test_attack` must be an AttackConfig, an AutoAttackConfig or a dict.*int"):
        as_robust_attack("test_attack", 3)
    assert as_robust_attack("test_attack", {"eps": 0.1, "steps": 3}) == AttackConfig(eps=0.1, steps=3)


def test_auto_is_pgd20_at_the_training_radius_and_other_strings_are_refused():
    auto = resolve_eval_attack("auto", AttackConfig(eps=0.3, norm="l2"))
    assert (auto.eps, auto.norm, auto.steps, auto.alpha, auto.mode) == (0.3, "l2", 20, 0.01, "eval")
    with pytest.raises(ValueError, match=r"`eval_attack` must be .* 'auto' or None, got 'pgd'"):
        resolve_eval_attack("pgd", AttackConfig())


def test_the_logits_under_attack_are_the_same_for_the_same_seed():
    torch.manual_seed(0)
    model, (x, y) = TinyNet(), tiny_batch(4)
    attack = AttackConfig(eps=0.1, alpha=0.05, steps=2, mode="eval")

    def logits(offset: int) -> torch.Tensor:
        return attacked_logits(model, attack, x, y, 0, seeded_generator(0, offset, 0, x.device), 10)

    assert torch.equal(logits(-1), logits(-1)) and not torch.equal(logits(-1), model(x))


def test_normalized_batches_come_back_as_pixels_for_a_model_that_normalizes_them_again():
    normalize = as_normalization([[0.5], [0.25]])
    x, y = tiny_batch(2)
    pixels, labels, _ = read_pixels(((x - 0.5) / 0.25, y), None, normalize)
    torch.testing.assert_close(pixels, x)
    torch.testing.assert_close(pixel_model(torch.nn.Identity(), normalize)(pixels), (x - 0.5) / 0.25)
    with pytest.raises(ValueError, match=r"`input_normalization` must be a pair \(mean, std\)"):
        as_normalization("imagenet")
    with pytest.raises(ValueError, match=r"`input_normalization` \(mean, std\): `std` entries must be > 0"):
        as_normalization([[0.5], [0.0]])
