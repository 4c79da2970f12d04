"""Selective adversarial training: pre-attack scores, attacking only the chosen rows, the mixed objective,
selective + data selection, the work saved, and bad input."""

from __future__ import annotations

import copy
import sys

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, TinyNet, digits, fit_steps, tiny_batch
from test_module import RowCounter, make
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from lightning_advsel import AdversarialSelectionModule, AttackConfig, StepSettings, adversarial_step, pgd
from lightning_advsel.attacks import model_mode
from lightning_advsel.cli import build_cli
from lightning_advsel.models import SmallCNN
from lightning_advsel.selection import (
    PRE_ATTACK_SCORES,
    ScoringPass,
    gradmatch_exact_score,
    gradmatch_score,
    margin_score,
    top_k,
)

sys.path.insert(0, str(REPO / "benchmarks"))
from flops_per_step import step_flops  # noqa: E402

DETERMINISTIC_ATTACK = AttackConfig(eps=0.1, alpha=0.05, steps=2, random_start=False, mode="train")


class ConvOnly(nn.Module):
    """A classifier with no nn.Linear: a 1x1 convolution to class maps, averaged."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 10, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


def scoring_pass(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ScoringPass:
    """Logits and the input of the last nn.Linear, as the module's scoring pass produces them."""
    features = []
    head = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    handle = head.register_forward_hook(lambda _m, inputs, _out: features.append(inputs[0]))
    with torch.no_grad():
        logits = net(x)
    handle.remove()
    return ScoringPass(net, x, y, logits, features[0])


def per_sample_cosines(net: nn.Module, x: torch.Tensor, y: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    """Cosine of each sample's autograd gradient over ``params`` with the batch mean, one backward per sample."""
    rows = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(F.cross_entropy(net(x[i:i + 1]), y[i:i + 1]), params)
        rows.append(torch.cat([g.flatten() for g in grads]))
    g = torch.stack(rows)
    return F.cosine_similarity(g, g.mean(0, keepdim=True), dim=1)


# ------------------------------------------------------------------------------------------------------ scores
def test_margin_score_is_the_gap_between_the_two_largest_logits_and_the_smallest_is_attacked_first():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.5, 0.4, -1.0], [-2.0, 4.0, 3.5], [0.0, 0.0, 0.0]])
    p = ScoringPass(nn.Identity(), torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), logits)
    assert torch.allclose(margin_score(p), torch.tensor([2.0, 0.1, 0.5, 0.0]))
    assert PRE_ATTACK_SCORES["margin"].pick(margin_score(p), 2).tolist() == [1, 3]

    torch.manual_seed(0)
    logits = torch.randn(32, 10)
    p = ScoringPass(nn.Identity(), torch.zeros(32, 1), torch.zeros(32, dtype=torch.long), logits)
    ordered = logits.sort(dim=1, descending=True).values
    assert torch.allclose(margin_score(p), ordered[:, 0] - ordered[:, 1])


def test_gradmatch_closed_form_equals_the_cosine_of_autograd_per_sample_last_layer_gradients():
    torch.manual_seed(0)
    net = TinyNet()
    x, y = tiny_batch(16)
    scores = gradmatch_score(scoring_pass(net, x, y))
    head = net.net[-1]
    expected = per_sample_cosines(net, x, y, [head.weight, head.bias])
    assert torch.allclose(scores, expected, atol=1e-5)
    assert PRE_ATTACK_SCORES["gradmatch"].pick(scores, 4).tolist() == top_k(expected, 4).tolist()


def test_gradmatch_exact_equals_a_per_sample_loop_over_all_parameters_in_eval_mode():
    torch.manual_seed(0)
    net = TinyNet(batchnorm=True)
    x, y = tiny_batch(16)
    net.train()
    scores = gradmatch_exact_score(ScoringPass(net, x, y, net(x).detach()))
    assert net.training  # the score restores the mode it found
    with model_mode(net, "eval"):
        expected = per_sample_cosines(net, x, y, list(net.parameters()))
    assert torch.allclose(scores, expected, atol=1e-5)


def test_gradmatch_exact_needs_no_final_linear():
    torch.manual_seed(0)
    net = ConvOnly()
    x, y = tiny_batch(8)
    scores = gradmatch_exact_score(ScoringPass(net, x, y, net(x).detach()))
    assert torch.allclose(scores, per_sample_cosines(net, x, y, list(net.parameters())), atol=1e-5)


# ------------------------------------------------------------------------------------------ the training step
@pytest.mark.parametrize("score", ["margin", "gradmatch"])
def test_the_module_scores_the_whole_clean_batch_attacks_the_chosen_half_and_logs_both_score_means(tmp_path, score):
    module = make("selective", 1.0, attack_score=score, attack_frac=0.5)
    model0 = copy.deepcopy(module.model)
    x, y = tiny_batch(16)
    trainer = fit_steps(module, x, y, tmp_path)
    with model_mode(model0, "train"):
        p = scoring_pass(model0, x, y)
    expected = margin_score(p) if score == "margin" else gradmatch_score(p)
    record = module.last_selection
    assert torch.allclose(record.attack_scores, expected, atol=1e-5)
    assert record.attacked.tolist() == PRE_ATTACK_SCORES[score].pick(expected, 8).tolist()
    rest = torch.ones(16, dtype=torch.bool)
    rest[record.attacked] = False
    metrics = trainer.callback_metrics
    assert float(metrics["train/attacked_frac"]) == pytest.approx(0.5)
    selected = float(metrics["train/attack_score_selected"])
    unselected = float(metrics["train/attack_score_unselected"])
    assert selected == pytest.approx(float(expected[record.attacked].mean()), abs=1e-5)
    assert unselected == pytest.approx(float(expected[rest].mean()), abs=1e-5)
    # Smallest margins / highest cosines were attacked.
    assert selected < unselected if score == "margin" else selected > unselected


def test_mixed_objective_is_the_batch_mean_of_adversarial_loss_on_attacked_rows_and_clean_loss_on_the_rest(tmp_path):
    module = make("selective", 1.0, attack_frac=0.5)
    model0 = copy.deepcopy(module.model)
    x, y = tiny_batch(16)
    fit_steps(module, x, y, tmp_path)
    record = module.last_selection
    attacked = record.attacked
    rest = torch.ones(16, dtype=torch.bool)
    rest[attacked] = False
    assert record.is_adv.sum() == 8 and record.selected.numel() == 16
    # By hand from the initial weights: each sample counts once, adversarial if attacked, clean otherwise.
    x_adv = pgd(model0, x[attacked], y[attacked], eps=0.1, alpha=0.05, steps=2, random_start=False, mode="train")
    loss = (F.cross_entropy(model0(x_adv), y[attacked], reduction="sum")
            + F.cross_entropy(model0(x[rest]), y[rest], reduction="sum")) / 16
    grads = torch.autograd.grad(loss, list(model0.parameters()))
    for before, after, g in zip(model0.parameters(), module.model.parameters(), grads, strict=True):
        assert torch.allclose((before - after) / 0.1, g, atol=1e-5)  # plain SGD, lr 0.1


def test_selective_with_attack_frac_1_takes_the_same_step_as_robust(tmp_path):
    x, y = tiny_batch(16)
    robust, selective = make("robust", 1.0), make("selective", 1.0, attack_frac=1.0)
    fit_steps(robust, x, y, tmp_path)
    trainer = fit_steps(selective, x, y, tmp_path)
    for a, b in zip(robust.model.parameters(), selective.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert "train/attack_score_unselected" not in trainer.callback_metrics  # no unattacked rows to average


def test_selective_ds_backpropagates_exactly_the_top_p_up_of_clean_batch_plus_attacked_rows(tmp_path):
    module = make("selective_ds", 0.5, attack_frac=0.5)
    model0 = copy.deepcopy(module.model)
    counter = RowCounter(module.model.net[-1])
    x, y = tiny_batch(16)
    fit_steps(module, x, y, tmp_path)
    record = module.last_selection
    attacked = record.attacked
    assert attacked.numel() == 8 and record.y.shape[0] == 24
    x_adv = pgd(model0, x[attacked], y[attacked], eps=0.1, alpha=0.05, steps=2, random_start=False, mode="train")
    with torch.no_grad(), model_mode(model0, "train"):
        losses = F.cross_entropy(model0(torch.cat([x, x_adv])), torch.cat([y, y[attacked]]), reduction="none")
    backward_rows, forward_rows = counter.backward_rows[-1], counter.forward_rows[-1]
    assert torch.allclose(record.pool_scores, losses, atol=1e-5)
    assert record.selected.tolist() == top_k(losses, 12).tolist()
    assert backward_rows == 12 and forward_rows == 12


# ---------------------------------------------------------------------------------------------- work saved
class CountingAttack(AttackConfig):
    """The training attack, counting the FLOPs and the batch rows of every call of the training step."""

    def unchecked(self, model, x, y, generator=None):
        with FlopCounterMode(display=False) as counter:
            out = super().unchecked(model, x, y, generator)
        self.calls.append((x.shape[0], counter.get_total_flops()))
        return out


def test_attack_at_attack_frac_half_does_half_the_work_of_the_full_pgd10_attack(tmp_path):
    x, y = tiny_batch(32)
    work = {}
    for recipe in ("robust", "selective"):
        attack = CountingAttack(eps=0.1, alpha=0.025, steps=10, mode="train")
        attack.calls = []
        fit_steps(make(recipe, 1.0, attack_frac=0.5, train_attack=attack), x, y, tmp_path)
        ((rows, flops),) = attack.calls
        work[recipe] = (rows, flops)
    assert work["robust"][0] == 32 and work["selective"][0] == 16
    assert work["selective"][1] * 2 == work["robust"][1] > 0


@pytest.mark.parametrize("score", ["margin", "gradmatch"])
def test_a_whole_selective_step_costs_at_most_0_62_of_a_pgd10_madry_step(score):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
    torch.manual_seed(0)
    robust = step_flops(SmallCNN(), x, y, "robust", steps=10)
    torch.manual_seed(0)
    selective = step_flops(SmallCNN(), x, y, "selective", attack_score=score, steps=10)
    # Analytic: (k + 4) / (2k + 3) = 14 / 23 = 0.609 for k = 10.
    assert selective / robust <= 0.62


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"attack_frac": 0}, r"`attack_frac` must be in \(0, 1\], got 0"),
        ({"attack_frac": 1.5}, r"`attack_frac` must be in \(0, 1\], got 1.5"),
        ({"attack_frac": float("nan")}, r"`attack_frac` must be a number in \(0, 1\], got nan"),
        ({"attack_score": "entropy"}, r"`attack_score` must be one of .*'gradmatch'.*got 'entropy'"),
        ({"attack_score": "gradmatch", "model": ConvOnly()},
         r"`attack_score`='gradmatch' needs a model whose final layer is an `nn.Linear`.*ConvOnly.*'gradmatch_exact'"),
    ],
)
def test_bad_selective_arguments_fail_at_construction(kwargs, match):
    args = {"model": TinyNet(), "recipe": "selective", **kwargs}
    with pytest.raises(ValueError, match=match):
        AdversarialSelectionModule(**args)


def test_exact_gradmatch_trains_a_model_without_a_final_linear(tmp_path):
    module = make("selective", 1.0, net=ConvOnly(), attack_score="gradmatch_exact")
    x, y = tiny_batch(16)
    fit_steps(module, x, y, tmp_path)
    assert module.last_selection.attacked.numel() == 8


class ScaledLogits(nn.Module):
    """Its last nn.Linear is not the output: the logits are that layer's output times 2."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.net(x)


def test_closed_form_gradmatch_refuses_a_model_whose_last_linear_is_not_the_output_before_any_update(tmp_path):
    net = ScaledLogits()
    before = copy.deepcopy(net.state_dict())
    module = make("selective", 1.0, net=net, attack_score="gradmatch")
    x, y = tiny_batch(16)
    with pytest.raises(ValueError, match=r"`attack_score`='gradmatch' takes the last nn.Linear .* not that layer's"):
        fit_steps(module, x, y, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_bad_attack_frac_from_the_command_line_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"`attack_frac` must be in \(0, 1\], got 1.5"):
        build_cli([*digits("selective_margin"),
                   "--model.init_args.attack_frac", "1.5", "--trainer.logger.init_args.save_dir", str(tmp_path)],
                  run=False)


# ------------------------------------------------------------------------------ the selective paper's variants
def test_margin_true_is_the_true_logit_minus_the_largest_other_and_reads_the_label():
    from lightning_advsel.selection import ScoringPass, margin_true_score

    logits = torch.tensor([[3.0, 1.0, 0.0], [3.0, 1.0, 0.0]])
    y = torch.tensor([0, 2])
    scores = margin_true_score(ScoringPass(None, None, y, logits))
    assert scores.tolist() == [2.0, -3.0]  # right with a gap of 2; wrong, 3 below the top logit


def test_proportional_sampling_draws_rows_near_the_boundary_more_often_and_is_seeded():
    from lightning_advsel.selection import PRE_ATTACK_SCORES

    score = PRE_ATTACK_SCORES["margin"]
    margins = torch.tensor([0.01, 0.02, 5.0, 6.0, 0.03, 7.0, 8.0, 9.0])
    picks = torch.zeros(8)
    for seed in range(200):
        picks[score.sample(margins, 2, torch.Generator().manual_seed(seed))] += 1
    assert picks[[0, 1, 4]].sum() > 0.95 * picks.sum()
    first = score.sample(margins, 4, torch.Generator().manual_seed(7))
    assert torch.equal(first, score.sample(margins, 4, torch.Generator().manual_seed(7)))
    assert first.tolist() == sorted(set(first.tolist()))


def test_proportional_sampling_needs_a_margin_score():
    with pytest.raises(ValueError, match=r"`attack_sampling`='proportional' .* got 'loss'"):
        StepSettings(recipe="selective", attack_score="loss", attack_sampling="proportional")


def test_clean_weight_scales_the_clean_rows_loss_in_the_mixed_objective():
    net = TinyNet()
    x, y = tiny_batch(16)
    base = dict(recipe="selective", p_up=1.0, attack_frac=0.25, train_attack=DETERMINISTIC_ATTACK)
    plain = adversarial_step(net, x, y, StepSettings(**base))
    weighted = adversarial_step(net, x, y, StepSettings(**base, clean_weight=0.5))
    ce = F.cross_entropy(plain.record.logits, y, reduction="none")  # the training forward of all 16 rows
    adv = plain.record.is_adv
    assert adv.sum() == 4
    assert plain.loss.item() == pytest.approx(ce.mean().item(), rel=1e-6)
    assert weighted.loss.item() == pytest.approx(((ce[adv].sum() + 0.5 * ce[~adv].sum()) / 16).item(), rel=1e-6)


def test_attack_warmup_epochs_attack_every_row_first(tmp_path):
    x, y = tiny_batch(16)
    seen = []

    class Attacked(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainer.current_epoch, pl_module.last_selection.attacked.numel()))

    module = make("selective", 1.0, attack_frac=0.25, attack_warmup_epochs=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    L.Trainer(default_root_dir=tmp_path, max_epochs=2, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, callbacks=[Attacked()]).fit(module, loader)
    assert seen == [(0, 16), (1, 4)]
    assert module.settings.attack_frac == 0.25


def test_clean_rows_all_adds_the_weighted_mean_clean_loss_of_the_whole_batch_to_the_mean_adversarial_loss():
    net = TinyNet()
    x, y = tiny_batch(16)
    out = adversarial_step(net, x, y, StepSettings(recipe="selective", p_up=1.0, attack_frac=0.25, clean_rows="all",
                                                    clean_weight=0.2, train_attack=DETERMINISTIC_ATTACK))
    record = out.record
    assert record.y.shape == (20,) and record.is_adv.sum() == 4  # the 16 clean rows and the 4 attacked ones
    ce = F.cross_entropy(record.logits, record.y, reduction="none")
    want = ce[record.is_adv].mean() + 0.2 * ce[~record.is_adv].mean()
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6)
    with torch.no_grad():
        assert torch.allclose(record.logits[~record.is_adv], net(x), atol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(recipe="ds"), dict(recipe="selective", p_up=0.5)])
def test_clean_rows_all_needs_the_selective_recipe_at_p_up_1(kwargs):
    with pytest.raises(ValueError, match=r"`clean_rows`='all' .* needs `recipe`='selective'"):
        StepSettings(clean_rows="all", **kwargs)


def test_a_random_warm_up_attacks_a_random_share_of_each_batch_first(tmp_path):
    x, y = tiny_batch(16)
    seen = []

    class Scores(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            record = pl_module.last_selection
            seen.append((record.attacked.numel(), record.attack_scores.min().item()))

    module = make("selective", 1.0, attack_frac=0.25, attack_warmup_epochs=1, attack_warmup="random",
                  attack_score="margin_true")
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    L.Trainer(default_root_dir=tmp_path, max_epochs=2, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, callbacks=[Scores()]).fit(module, loader)
    (warm, warm_low), (after, after_low) = seen
    assert warm == after == 4
    assert warm_low >= 0 and after_low < 0  # uniform scores in [0, 1) first, then margins (some negative)


def test_the_authors_recipe_overlay_parses_with_their_settings(tmp_path):
    cli = build_cli(["--config", str(REPO / "configs" / "digits" / "base.yaml"), "--config",
                     str(REPO / "configs" / "recipes" / "selective_authors.yaml"),
                     "--trainer.logger.init_args.save_dir", str(tmp_path)], run=False)
    s = cli.model.settings
    assert (s.recipe, s.attack_frac, s.attack_score, s.attack_sampling, s.clean_rows, s.clean_weight,
            s.scoring_mode) == ("selective", 0.25, "margin_true", "proportional", "all", 0.2, "eval")
    assert cli.model.attack_warmup == "random" and cli.model.attack_warmup_epochs == 20
