"""PGD and its one-step cases: the threat model, strength, and side effects on the model."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import NearUniform, TinyNet, tiny_batch
from torch import nn

from lightning_advsel.attacks import AttackConfig, fgsm, fgsm_rs, margin_loss, model_mode, pgd


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet()


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_pgd_stays_in_eps_ball_and_pixel_range(net, norm, eps):
    x, y = tiny_batch(32)
    x_adv = pgd(net, x, y, eps=eps, alpha=eps / 4, steps=7, norm=norm)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert x_adv.shape == x.shape and not x_adv.requires_grad


def _loss(net, x, y):
    with torch.no_grad():
        return F.cross_entropy(net(x), y).item()


def test_pgd_raises_loss_over_clean_and_over_random_noise_of_same_size(net):
    x, y = tiny_batch(64)
    eps = 0.1
    x_adv = pgd(net, x, y, eps=eps, alpha=0.025, steps=10)
    noise = (x + eps * torch.randint(0, 2, x.shape).float().mul(2).sub(1)).clamp(0, 1)
    assert _loss(net, x_adv, y) > _loss(net, x, y) + 0.05
    assert _loss(net, x_adv, y) > _loss(net, noise, y) + 0.05


def test_more_steps_do_not_weaken_the_attack(net):
    x, y = tiny_batch(64)
    one = pgd(net, x, y, eps=0.1, alpha=0.025, steps=1, random_start=False)
    ten = pgd(net, x, y, eps=0.1, alpha=0.025, steps=10, random_start=False)
    assert _loss(net, ten, y) >= _loss(net, one, y)


def test_attack_leaves_parameter_grads_untouched(net):
    x, y = tiny_batch()
    first = next(net.parameters())
    first.grad = torch.full_like(first, 3.0)
    pgd(net, x, y, eps=0.1, alpha=0.02, steps=3)
    assert torch.equal(first.grad, torch.full_like(first, 3.0))
    assert all(p.grad is None for p in list(net.parameters())[1:])


def test_fgsm_is_one_full_step_to_the_ball_corner(net):
    x, y = tiny_batch()
    x = x.clamp(0.2, 0.8)  # away from the pixel bounds so no clamping to [0, 1] interferes
    x_adv = fgsm(net, x, y, eps=0.05)
    moved = (x_adv - x).abs()
    assert torch.allclose(moved[moved > 0], torch.tensor(0.05), atol=1e-6)


def test_fgsm_rs_uses_its_generator():
    torch.manual_seed(0)
    net = TinyNet()
    x, y = tiny_batch()
    a = fgsm_rs(net, x, y, eps=0.1, generator=torch.Generator().manual_seed(1))
    b = fgsm_rs(net, x, y, eps=0.1, generator=torch.Generator().manual_seed(1))
    c = fgsm_rs(net, x, y, eps=0.1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ((a - x).abs() <= 0.1 + 1e-6).all()


def test_restarts_keep_a_misclassifying_example_per_sample(net):
    x, y = tiny_batch(64)
    single = pgd(net, x, y, eps=0.05, alpha=0.02, steps=2, generator=torch.Generator().manual_seed(0))
    multi = pgd(net, x, y, eps=0.05, alpha=0.02, steps=2, restarts=4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        wrong_single = net(single).argmax(1) != y
        wrong_multi = net(multi).argmax(1) != y
    # The first restart is the single run, so every sample it fooled stays fooled.
    assert (wrong_multi | ~wrong_single).all()
    assert wrong_multi.sum() >= wrong_single.sum()


def test_attack_works_under_inference_mode(net):
    x, y = tiny_batch()
    with torch.inference_mode():
        x_adv = pgd(net, x, y, eps=0.1, alpha=0.025, steps=5, random_start=False)
    assert _loss(net, x_adv, y) > _loss(net, x, y)


def test_train_mode_attack_keeps_batchnorm_running_stats_and_restores_modes():
    torch.manual_seed(0)
    net = TinyNet(batchnorm=True).eval()
    bn = net.net[1]
    bn.running_mean.fill_(0.3)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x, y = tiny_batch()
    pgd(net, x, y, eps=0.1, alpha=0.025, steps=3, mode="train")
    assert all(torch.equal(before[k], v) for k, v in bn.state_dict().items())
    assert not any(m.training for m in net.modules())
    net.train()
    with model_mode(net, "eval"):
        assert not bn.training
    assert bn.training


def test_attack_config_calls_pgd_with_its_settings(net):
    x, y = tiny_batch()
    cfg = AttackConfig(eps=0.05, alpha=0.01, steps=3, random_start=False)
    direct = pgd(net, x, y, eps=0.05, alpha=0.01, steps=3, random_start=False)
    assert torch.equal(cfg(net, x, y), direct)
    assert cfg.describe() == "PGD-3 linf eps=0.05 alpha=0.01 restarts=1"


def test_margin_loss_is_the_largest_wrong_logit_minus_the_true_one():
    logits = torch.tensor([[3.0, 1.0, 0.5], [0.0, 2.0, 1.5]])
    assert torch.equal(margin_loss(logits, torch.tensor([0, 0])), torch.tensor([-2.0, 2.0]))


def test_margin_loss_breaks_a_near_uniform_model_that_cross_entropy_pgd_rates_robust():
    x, y = torch.full((8, 1, 1, 2), 0.5), torch.zeros(8, dtype=torch.long)
    model = NearUniform()
    settings = {"eps": 0.1, "alpha": 0.05, "steps": 5}
    ce, margin = AttackConfig(**settings), AttackConfig(**settings, loss="margin")
    g = torch.Generator().manual_seed(0)
    assert (model(ce(model, x, y, generator=g)).argmax(1) == y).all()  # PGD on the cross-entropy: all robust
    broken = margin(model, x, y, generator=torch.Generator().manual_seed(0))
    assert (model(broken).argmax(1) == 1).all()  # on the margin: every row flipped, to the nearest class
    # The config's loss is pgd's `loss=margin_loss`, and a caller's own loss replaces it.
    assert torch.equal(broken, pgd(model, x, y, **settings, loss=margin_loss,
                                   generator=torch.Generator().manual_seed(0)))
    own = margin(model, x, y, generator=torch.Generator().manual_seed(0),
                 loss=lambda logits, t: F.cross_entropy(logits, t, reduction="none"))
    assert (model(own).argmax(1) == y).all()
    assert margin.describe() == "PGD-5 linf eps=0.1 alpha=0.05 restarts=1 loss=margin"
    with pytest.raises(ValueError, match=r"`loss` must be one of \('ce', 'margin'\), got 'cw'"):
        AttackConfig(loss="cw")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"eps": -0.1}, r"`eps` must be a finite number >= 0.*-0.1"),
        ({"alpha": -1.0}, r"`alpha` must be a finite number >= 0.*-1.0"),
        ({"eps": float("nan")}, r"`eps` must be a finite number.*nan"),
        ({"eps": 1.5}, r"`eps` must be <= 1 for the linf norm.*1.5"),
        ({"steps": 0}, r"`steps` must be an integer >= 1, got 0"),
        ({"steps": 2.5}, r"`steps` must be an integer >= 1, got 2.5"),
        ({"restarts": 0}, r"`restarts` must be an integer >= 1, got 0"),
        ({"norm": "l1"}, r"`norm` must be one of \('linf', 'l2'\), got 'l1'"),
        ({"mode": "sideways"}, r"`mode` must be one of .*'sideways'"),
    ],
)
def test_bad_attack_settings_are_refused_with_the_argument_named(net, kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttackConfig(**kwargs)
    x, y = tiny_batch(4)
    args = {"eps": 0.1, "alpha": 0.01, "steps": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        pgd(net, x, y, **args)


@pytest.mark.parametrize("bad", [1.0000001, -1e-8])
def test_pixel_range_error_shows_the_offending_value_outside_the_range(net, bad):
    x, y = tiny_batch(4)
    x[1, 0, 2, 3] = bad
    with pytest.raises(ValueError, match=r"pixels in \[0, 1\]") as info:
        pgd(net, x, y, eps=0.1, alpha=0.01, steps=1)
    low, high = (float(v) for v in re.search(r"got values in \[(\S+), (\S+)\]", str(info.value)).groups())
    assert low == float(x.min()) and high == float(x.max())  # exact: not rounded back into [0, 1]
    assert low < 0 or high > 1
