"""Training objectives (cross-entropy, TRADES, MART): their per-sample losses, their attacks, and selection on pairs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet, config_args, fit_steps, tiny_batch
from test_module import DETERMINISTIC_ATTACK, make

from lightning_advsel import AttackConfig, StepSettings, adversarial_step, pgd
from lightning_advsel.cli import build_cli
from lightning_advsel.objectives import Objective, mart_loss, trades_loss
from lightning_advsel.selection import top_k

CLEAN = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
ADV = torch.tensor([[0.5, 1.5, -1.0], [0.3, 0.2, -0.4]])
Y = torch.tensor([0, 2])


def softmax_rows(logits):
    return [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits.tolist()]


def test_trades_per_sample_loss_is_the_clean_cross_entropy_plus_beta_times_the_kl_to_the_adversarial_prediction():
    p, q = softmax_rows(CLEAN), softmax_rows(ADV)
    want = [-math.log(p[i][Y[i]]) + 6.0 * sum(p[i][c] * math.log(p[i][c] / q[i][c]) for c in range(3))
            for i in range(2)]
    assert trades_loss(CLEAN, ADV, Y, beta=6.0).tolist() == pytest.approx(want, rel=1e-5)


def test_mart_per_sample_loss_is_the_boosted_adversarial_cross_entropy_plus_the_weighted_kl():
    p, q = softmax_rows(CLEAN), softmax_rows(ADV)
    want = []
    for i in range(2):
        y = int(Y[i])
        runner_up = max((c for c in range(3) if c != y), key=lambda c: q[i][c])
        boosted = -math.log(q[i][y]) - math.log(1.0001 - q[i][runner_up])
        kl = sum(p[i][c] * math.log(p[i][c] / q[i][c]) for c in range(3))
        want.append(boosted + 5.0 * kl * (1.0000001 - p[i][y]))
    assert mart_loss(CLEAN, ADV, Y, lam=5.0).tolist() == pytest.approx(want, rel=1e-5)


def test_equal_clean_and_adversarial_inputs_leave_trades_with_the_clean_cross_entropy():
    assert trades_loss(CLEAN, CLEAN, Y, beta=6.0).tolist() == pytest.approx(
        F.cross_entropy(CLEAN, Y, reduction="none").tolist(), abs=1e-6)


def test_pgd_maximises_a_given_loss_and_leaves_parameter_gradients_alone():
    net = TinyNet()
    x, y = tiny_batch(16)
    with torch.no_grad():
        clean = net(x)
    objective = Objective("trades")
    loss = objective.attack_loss(net, x, "eval")
    x_adv = pgd(net, x, y, eps=0.1, alpha=0.02, steps=5, loss=loss, start_std=objective.start_std,
                generator=torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        kl_adv = loss(net(x_adv), y)
        kl_start = loss(net((x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))
                            .clamp(0, 1)), y)
    assert kl_adv.sum() > 10 * kl_start.sum()
    assert torch.equal(loss(clean, y), torch.zeros(16)) or loss(clean, y).abs().max() < 1e-6
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("name", ["trades", "mart"])
def test_robust_training_with_a_paired_objective_minimises_the_mean_objective_of_every_pair(name):
    net = TinyNet()
    x, y = tiny_batch(16)
    settings = StepSettings(recipe="robust", p_up=1.0, train_attack=DETERMINISTIC_ATTACK, objective=Objective(name))
    out = adversarial_step(net, x, y, settings)
    loss = settings.objective.attack_loss(net, x, "train")
    x_adv = pgd(net, x, y, eps=0.1, alpha=0.05, steps=2, random_start=False, mode="train", loss=loss)
    direct = trades_loss if name == "trades" else mart_loss
    want = direct(net(x), net(x_adv), y, settings.objective.weight).mean()
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert out.record.is_adv.all() and out.record.selected.tolist() == list(range(16))
    # Clean and adversarial forwards of the 16 pairs, both backpropagated; 16 x 2 attack steps.
    assert (out.cost.forward_rows, out.cost.backward_rows, out.cost.attack_grad_steps) == (
        (32 if name == "mart" else 48), 32, 32)


@pytest.mark.parametrize("name", ["trades", "mart"])
def test_ds_with_a_paired_objective_backpropagates_the_top_p_up_of_the_pairs_by_their_objective(name):
    net = TinyNet()
    x, y = tiny_batch(16)
    out = adversarial_step(net, x, y, StepSettings(recipe="ds", p_up=0.25, train_attack=DETERMINISTIC_ATTACK,
                                                    objective=Objective(name)))
    record = out.record
    assert record.y.shape == (16,) and record.pool_scores.shape == (16,)  # the pool is the 16 pairs
    assert record.selected.tolist() == top_k(record.pool_scores, 4).tolist()
    assert out.loss.item() == pytest.approx(record.pool_scores[record.selected].mean().item(), rel=1e-5)


def test_selective_with_trades_trains_attacked_pairs_on_trades_and_the_rest_on_the_clean_cross_entropy():
    net = TinyNet()
    x, y = tiny_batch(16)
    out = adversarial_step(net, x, y, StepSettings(recipe="selective", p_up=1.0, attack_frac=0.25,
                                                    train_attack=DETERMINISTIC_ATTACK, objective=Objective("trades")))
    attacked = out.record.attacked
    assert attacked.numel() == 4 and out.record.is_adv.sum() == 4
    with torch.no_grad():
        clean_ce = F.cross_entropy(net(x), y, reduction="none")
    rest = torch.ones(16, dtype=torch.bool)
    rest[attacked] = False
    # The loss is the mean over 16 pairs: 12 clean cross-entropies plus 4 TRADES terms of at least their CE.
    assert out.loss.item() >= clean_ce.mean().item() - 1e-6
    assert out.loss.item() * 16 >= clean_ce[rest].sum().item() + clean_ce[attacked].sum().item() - 1e-5


def test_random_selection_with_mart_picks_a_random_p_up_of_the_pairs():
    x, y = tiny_batch(16)
    out = adversarial_step(TinyNet(), x, y, StepSettings(recipe="random", p_up=0.5, train_attack=DETERMINISTIC_ATTACK,
                                                          objective=Objective("mart")),
                           generator=torch.Generator().manual_seed(3))
    assert out.record.selected.numel() == 8 and out.record.pool_scores is None and out.record.y.shape == (16,)


@pytest.mark.parametrize("recipe,why", [("standard", "attacks no row"), ("selective_ds", "use that")])
def test_recipes_that_cannot_carry_a_paired_objective_refuse_it_saying_why(recipe, why):
    with pytest.raises(ValueError, match=rf"`recipe`='{recipe}' cannot train objective 'trades': .*{why}"):
        StepSettings(recipe=recipe, objective=Objective("trades"))


def test_trades_refuses_a_margin_training_attack_it_would_not_run():
    with pytest.raises(ValueError, match=r"objective 'trades' attacks its own loss .* got 'margin'"):
        StepSettings(recipe="robust", objective=Objective("trades"), train_attack=AttackConfig(loss="margin"))
    StepSettings(recipe="robust", objective=Objective("mart"), train_attack=AttackConfig(loss="margin"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="ce", weight=1.0), r"`objective_weight` is the beta of TRADES or the lambda of MART"),
    (dict(name="trades", weight=-1.0), r"`objective_weight` must be a finite number >= 0"),
    (dict(name="mart", label_smoothing=0.1), r"`label_smoothing` applies to the objective 'ce' only"),
    (dict(name="ce", label_smoothing=1.0), r"`label_smoothing` must be in \[0, 1\), got 1.0"),
    (dict(name="hinge"), r"`objective` must be one of \('ce', 'trades', 'mart'\), got 'hinge'"),
])
def test_bad_objective_settings_fail_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Objective(**kwargs)


def test_label_smoothing_changes_only_the_training_loss_of_the_selected_rows():
    x, y = tiny_batch(16)
    net = TinyNet()
    out = adversarial_step(net, x, y, StepSettings(recipe="ds", p_up=0.5, train_attack=DETERMINISTIC_ATTACK,
                                                    objective=Objective("ce", label_smoothing=0.1)))
    selected = out.record.selected
    pool_x = torch.cat([x, pgd(net, x, y, eps=0.1, alpha=0.05, steps=2, random_start=False, mode="train")])
    want = F.cross_entropy(net(pool_x[selected]), out.record.y[selected], label_smoothing=0.1)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6)
    # Scores stay the plain cross-entropy of the DS paper.
    assert out.record.pool_scores[selected].mean().item() != pytest.approx(out.loss.item(), rel=1e-3)


@pytest.mark.parametrize("objective,recipe", [("trades", "ds"), ("mart", "selective")])
def test_the_module_trains_a_paired_objective(tmp_path, objective, recipe):
    x, y = tiny_batch(16)
    module = make(recipe, 0.5 if recipe == "ds" else 1.0, objective=objective,
                  train_attack=AttackConfig(eps=0.1, alpha=0.05, steps=2, mode="train"))
    before = [p.detach().clone() for p in module.model.parameters()]
    trainer = fit_steps(module, x, y, tmp_path, steps=2)
    assert trainer.global_step == 2 and module.settings.objective.name == objective
    assert any(not torch.equal(a, b) for a, b in zip(before, module.model.parameters(), strict=True))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("objective", ["trades", "mart"])
def test_an_objective_overlay_trains_from_the_command_line_and_names_the_run(tmp_path, objective):
    cli = build_cli(["fit", *config_args("digits/base.yaml", "recipes/ds.yaml", f"objectives/{objective}.yaml"),
                     "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches",
                     "1", "--model.init_args.train_attack.steps", "2", "--model.init_args.eval_attack.steps", "2",
                     "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert cli.model.settings.objective.name == objective and cli.trainer.global_step == 2
    assert Path(cli.trainer.log_dir).relative_to(tmp_path).parts[:3] == ("digits", "ds", objective)
    saved = torch.load(Path(cli.trainer.checkpoint_callback.last_model_path), weights_only=True)
    assert saved["hyper_parameters"]["objective"] == objective
