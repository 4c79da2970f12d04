"""The callbacks of the DS paper's Figures 4-8: schedule, make-up counts, minimum perturbation, figures, resume."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import NearUniform, TinyNet, config_args, tiny_batch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_advsel import AdversarialSelectionModule, AttackConfig
from lightning_advsel.callbacks import (
    AdaptivePUp,
    MinimumPerturbation,
    PaperFigures,
    SelectionMakeup,
    minimum_adversarial_pool,
    minimum_eps,
    next_p_up,
    p_up_sequence,
)

FAST_ATTACK = AttackConfig(eps=0.1, alpha=0.05, steps=2, mode="train")


def make_module(p_up: float = 0.5, seed: int = 0) -> AdversarialSelectionModule:
    torch.manual_seed(seed)
    return AdversarialSelectionModule(TinyNet(), recipe="ds", p_up=p_up, num_classes=10, train_attack=FAST_ATTACK,
                                      eval_attack=AttackConfig(eps=0.1, alpha=0.05, steps=2), seed=seed)


def loaders(n_train: int = 64, n_val: int = 32, batch_size: int = 16) -> tuple[DataLoader, DataLoader]:
    x, y = tiny_batch(n_train + n_val, seed=1)
    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=batch_size, shuffle=False)
    val = DataLoader(TensorDataset(x[n_train:], y[n_train:]), batch_size=batch_size, shuffle=False)
    return train, val


def trainer(tmp_path: Path, callbacks: list[Callback], max_epochs: int = 2, **kwargs) -> L.Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(default_root_dir=tmp_path, max_epochs=max_epochs, callbacks=callbacks, accelerator="cpu",
                     devices=1, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     **kwargs)


# ------------------------------------------------------------------------------------------------ schedule
def test_paper_schedule_is_eq9_floored_and_recursive():
    assert next_p_up(1.0, 0.2, "paper", 0.1) == pytest.approx(0.8)
    assert next_p_up(0.5, 0.2, "paper", 0.1) == pytest.approx(0.4)
    assert next_p_up(0.2, 0.8, "paper", 0.1) == pytest.approx(0.1)  # 0.04 floored
    assert p_up_sequence([0.8, 0.8, 0.8], "paper", min_p_up=0.01) == pytest.approx([1.0, 0.2, 0.04, 0.01])
    assert p_up_sequence([0.5, 0.5], "paper", min_p_up=0.3) == pytest.approx([1.0, 0.5, 0.3])


def test_complement_schedule_is_one_minus_accuracy_clipped():
    assert p_up_sequence([0.3, 0.6, 0.99, 0.0], "complement", min_p_up=0.1) == pytest.approx(
        [1.0, 0.7, 0.4, 0.1, 1.0])


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "linear"}, r"`mode` must be one of .*'linear'"),
    ({"acc": 1.5}, r"`acc` must be in \[0, 1\], got 1.5"),
    ({"prev": 0.0}, r"`prev` must be in \(0, 1\], got 0.0"),
    ({"min_p_up": 0.0}, r"`min_p_up` must be in \(0, 1\], got 0.0"),
])
def test_schedule_rejects_values_outside_their_range(kwargs, match):
    args = {"prev": 1.0, "acc": 0.5, "mode": "paper", "min_p_up": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        next_p_up(**args)


# ------------------------------------------------------------------------------------------ arg validation
@pytest.mark.parametrize("factory,match", [
    (lambda: AdaptivePUp(mode="exp"), r"`mode` must be one of .*'exp'"),
    (lambda: AdaptivePUp(min_p_up=0), r"`min_p_up` must be in \(0, 1\], got 0"),
    (lambda: AdaptivePUp(initial_p_up=1.5), r"`initial_p_up` must be in \(0, 1\], got 1.5"),
    (lambda: AdaptivePUp(min_p_up=0.5, initial_p_up=0.2), r"`initial_p_up` must be >= `min_p_up`=0.5, got 0.2"),
    (lambda: AdaptivePUp(monitor=""), r"`monitor` must be a non-empty metric key"),
    (lambda: MinimumPerturbation(probe_size=0), r"`probe_size` must be an integer >= 1, got 0"),
    (lambda: MinimumPerturbation(num_eps=2.5), r"`num_eps` must be an integer >= 1, got 2.5"),
    (lambda: MinimumPerturbation(max_eps=-0.1), r"`max_eps` must be a finite number > 0, got -0.1"),
    (lambda: MinimumPerturbation(norm="l1"), r"`norm` must be one of .*'l1'"),
    (lambda: MinimumPerturbation(max_train_rows=0), r"`max_train_rows` must be an integer >= 1 or None, got 0"),
    (lambda: MinimumPerturbation(loss="cw"), r"`loss` must be one of \('ce', 'margin', None\), got 'cw'"),
    (lambda: PaperFigures(dpi=0), r"`dpi` must be an integer >= 10, got 0"),
])
def test_callbacks_reject_bad_arguments_naming_them(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_missing_monitor_key_fails_listing_the_available_keys(tmp_path):
    train, _ = loaders()
    with pytest.raises(ValueError, match=r"`monitor`='val/acc_nope' is not among .*available keys: .*'train/acc'"):
        trainer(tmp_path, [AdaptivePUp(monitor="val/acc_nope")], max_epochs=1).fit(make_module(), train)


def test_probe_larger_than_the_validation_set_fails_before_training(tmp_path):
    train, val = loaders(n_val=32)
    t = trainer(tmp_path, [MinimumPerturbation(probe_size=33)], max_epochs=1)
    with pytest.raises(ValueError, match=r"`probe_size`=33 is larger than the validation set \(32 samples\)"):
        t.fit(make_module(), train, val)
    assert t.global_step == 0


# --------------------------------------------------------------------------------------- state and resume
def test_every_stateful_callback_round_trips_its_state_and_loads_old_checkpoints():
    adaptive = AdaptivePUp()
    adaptive.next_value, adaptive.history, adaptive.accs = 0.3, [1.0, 0.6], [0.4, 0.5]
    makeup = SelectionMakeup()
    makeup.history = [{"epoch": 0, "n_clean": 3, "n_adv": 5, "class_clean": [1, 2], "class_adv": [4, 1]}]
    probe = MinimumPerturbation()
    probe.history = [{"epoch": 2, "max_eps": 0.2, "eps": [0.1, 0.2], "minperturb/mean": 0.15,
                      "minperturb/selected_min_adv_frac": 0.75, "train_rows": 16, "train_misclassified": 2,
                      "train_unflipped": 6, "pool_size": 16, "selected": 8, "selected_min_adv": 6}]
    figures = PaperFigures()
    figures.history = [{"epoch": 0, "p_up": 1.0, "val/acc_clean": 0.5}]
    for cb, fresh in ((adaptive, AdaptivePUp()), (makeup, SelectionMakeup()), (probe, MinimumPerturbation()),
                      (figures, PaperFigures())):
        saved = torch.load(_roundtrip(cb.state_dict()), weights_only=True)
        fresh.load_state_dict(saved)
        assert fresh.state_dict() == cb.state_dict()
        empty = type(cb)()
        empty.load_state_dict({})  # a checkpoint written before the callback existed
        assert empty.history == []
    assert AdaptivePUp(initial_p_up=0.7).next_value == 0.7


def _roundtrip(state: dict) -> Path:
    import io
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_resumed_run_continues_the_p_up_sequence_of_an_uninterrupted_run(tmp_path):
    train, _ = loaders()

    def run(max_epochs: int, root: Path, ckpt: str | None = None) -> AdaptivePUp:
        cb = AdaptivePUp(monitor="train/acc", mode="paper", min_p_up=0.05)
        L.seed_everything(0)
        t = trainer(root, [cb, ModelCheckpoint(dirpath=root, save_last=True)], max_epochs=max_epochs,
                    enable_checkpointing=True, limit_val_batches=0)
        t.fit(make_module(), train, ckpt_path=ckpt)
        return t, cb

    _, full = run(4, tmp_path / "full")
    _, first = run(2, tmp_path / "part")
    t, resumed = run(4, tmp_path / "resumed", ckpt=str(tmp_path / "part" / "last.ckpt"))
    assert len(full.history) == 4 and len(set(full.history)) == 4
    assert resumed.history == full.history
    assert resumed.accs == full.accs
    assert first.history == full.history[:2]
    assert t.lightning_module.p_up == full.history[-1]
    assert full.history == pytest.approx(p_up_sequence(full.accs, "paper", 0.05)[:4])


# -------------------------------------------------------------------------------------------- make-up
class RecordSelections(Callback):
    def __init__(self) -> None:
        self.per_epoch: dict[int, list] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        r = pl_module.last_selection
        rows = [(int(r.y[i]), bool(r.is_adv[i])) for i in r.selected.tolist()]
        self.per_epoch.setdefault(trainer.current_epoch, []).extend(rows)


def test_makeup_counts_equal_a_direct_count_of_the_selected_rows(tmp_path):
    train, _ = loaders()
    makeup, record = SelectionMakeup(), RecordSelections()
    t = trainer(tmp_path, [makeup, record], max_epochs=2, limit_val_batches=0)
    t.fit(make_module(p_up=0.3), train)
    assert [h["epoch"] for h in makeup.history] == [0, 1]
    for h in makeup.history:
        rows = record.per_epoch[h["epoch"]]
        assert h["n_adv"] == sum(adv for _, adv in rows)
        assert h["n_clean"] == sum(not adv for _, adv in rows)
        assert h["n_clean"] + h["n_adv"] == 4 * round(0.3 * 32)
        for c in range(10):
            assert h["class_adv"][c] == sum(adv and y == c for y, adv in rows)
            assert h["class_clean"][c] == sum(not adv and y == c for y, adv in rows)
    last = makeup.history[-1]
    metrics = t.callback_metrics
    # The module's share and the callback's counts describe the same rows.
    assert float(metrics["train/selected_adv_frac"]) == pytest.approx(last["n_adv"] / (last["n_adv"] + last["n_clean"]))
    assert float(metrics["selection/n_adv"]) == last["n_adv"]


# ----------------------------------------------------------------------------------- minimum perturbation
@pytest.mark.parametrize("norm,dual", [("linf", 1), ("l2", 2)])
def test_minimum_eps_of_a_linear_model_matches_the_closed_form_within_the_grid_resolution(norm, dual):
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(2, 16, generator=g))
        model[1].bias.copy_(-model[1].weight.sum(1) * 0.5)  # boundary through the grey image x = 0.5
    # Inputs near mid-range and radii below 0.2: x + delta stays inside (0, 1), so the [0, 1] clamp never binds
    # and the distance to the boundary is |margin| / ||w_y - w_other||_dual (dual of L-inf is L1, of L2 is L2).
    x = 0.45 + 0.1 * torch.rand(200, 1, 4, 4, generator=g)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    w_diff = model[1].weight[y] - model[1].weight[1 - y]  # (N, 16)
    margin = (logits.gather(1, y[:, None]) - logits.gather(1, (1 - y)[:, None])).squeeze(1)
    exact = margin / w_diff.norm(p=dual, dim=1)
    max_eps = 0.015 if norm == "linf" else 0.04
    radii = torch.linspace(max_eps / 30, max_eps, 30)
    found, x_min = minimum_eps(model, x, y, radii, norm=norm, steps=5)
    resolution = max_eps / 30
    flipped = torch.isfinite(found)
    assert 20 < int(flipped.sum()) < 200  # both cases occur
    assert (exact[~flipped] > max_eps - 1e-5).all()
    assert (found[flipped] >= exact[flipped] - 1e-5).all()
    assert (found[flipped] - resolution < exact[flipped] + 1e-5).all()
    with torch.no_grad():
        assert (model(x_min[flipped]).argmax(1) != y[flipped]).all()
    assert (x_min > 0).all() and (x_min < 1).all()


def test_minimum_eps_on_the_margin_finds_the_radius_the_cross_entropy_misses():
    # NearUniform: class 1 overtakes the true class 0 once the first pixel passes 0.55; PGD on the cross-entropy
    # walks the other way (towards the eight trailing classes), and nothing flips within 0.09.
    model, x, y = NearUniform(), torch.full((4, 1, 1, 2), 0.5), torch.zeros(4, dtype=torch.long)
    radii = torch.tensor([0.03, 0.06, 0.09])
    ce, _ = minimum_eps(model, x, y, radii, steps=3)
    margin, x_min = minimum_eps(model, x, y, radii, steps=3, loss="margin")
    assert torch.isinf(ce).all()
    assert margin.tolist() == pytest.approx([0.06] * 4)
    assert (model(x_min).argmax(1) == 1).all()
    with pytest.raises(ValueError, match=r"`loss` must be one of \('ce', 'margin'\), got 'cw'"):
        minimum_eps(model, x, y, radii, loss="cw")


@pytest.mark.parametrize("train_loss,given,used", [("ce", None, "ce"), ("margin", None, "margin"),
                                                    ("margin", "ce", "ce")])
def test_minimum_perturbation_searches_with_the_training_attack_loss_unless_told(tmp_path, train_loss, given, used):
    # The radii on NearUniform's probe tell which loss the callback's PGD maximised (see the test above).
    x, y = torch.full((4, 1, 1, 2), 0.5), torch.zeros(4, dtype=torch.long)
    model = nn.Sequential(NearUniform(), nn.Linear(10, 10))  # a trainable identity, for the optimizer
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(10))
        model[1].bias.zero_()
    module = AdversarialSelectionModule(model, recipe="ds", num_classes=10,
                                        train_attack=AttackConfig(eps=0.045, alpha=0.02, steps=1, loss=train_loss),
                                        optimizer=functools.partial(torch.optim.SGD, lr=0.0))  # no weights
    probe = MinimumPerturbation(probe_size=4, max_eps=0.09, num_eps=3, steps=3, loss=given)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    trainer(tmp_path, [probe], max_epochs=1).fit(module, loader, loader)
    assert probe.loss == used
    assert probe.history[-1]["eps"] == pytest.approx([0.09] * 4 if used == "ce" else [0.06] * 4)
    assert probe.history[-1]["minperturb/unflipped_frac"] == (1.0 if used == "ce" else 0.0)


# ------------------------------------------------------------------------------ Fig. 8 on a training batch
def three_class_linear() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A linear model on two pixels ``(a, b)`` with logits ``(40 (a - 0.5), 0, 10 (b - 0.5))`` and four rows of
    class 0, one of each kind: unconfident (logit 0.105 above class 1, class 2 level with class 1), confident
    (2.98 above, class 2 far below), misclassified clean (-1), and out of reach (8: needs radius 0.2).

    On this model L-inf PGD walks to the corner ``(a - r, b + r)`` of the ball (the loss gradient's signs are
    fixed), so a row flips past the radius where ``l0 - 40 r = max(0, l2 + 10 r)``: 0.0021 for the unconfident
    row, 0.0745 for the confident one, which the grid 0.025, 0.05, 0.075, 0.1 rounds up to 0.025 and 0.075.
    """
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[40.0, 0.0], [0.0, 0.0], [0.0, 10.0]]))
        model[1].bias.copy_(torch.tensor([-20.0, 0.0, -5.0]))
    a = 0.5 + torch.tensor([0.105, 2.98, -1.0, 8.0]) / 40
    b = torch.tensor([0.5, 0.0, 0.5, 0.0])
    return model, torch.stack([a, b], 1).view(4, 1, 1, 2), torch.zeros(4, dtype=torch.long)


GRID = torch.tensor([0.025, 0.05, 0.075, 0.1], dtype=torch.float64)  # L-inf radii, pixels


@pytest.mark.parametrize("p_up,selected", [(0.25, [2]), (0.5, [0, 2]), (0.75, [0, 2, 3]), (1.0, [0, 1, 2, 3])])
def test_fig8_pool_of_a_linear_model_selects_as_the_closed_form_losses_say(p_up, selected):
    model, x, y = three_class_linear()
    pool = minimum_adversarial_pool(model, x, y, GRID, p_up, steps=5)
    assert pool.min_eps[:3].tolist() == pytest.approx([0.025, 0.075, 0.0])
    assert math.isinf(pool.min_eps[3])
    assert pool.rows.tolist() == [0, 1]  # misclassified clean and unflipped rows are left out, clean row too
    # Cross-entropy from the logits at x and at the corner (a - r, b + r):
    # unconfident clean (0.105, 0, 0), confident clean (2.98, 0, -5), their minimum adversarial examples
    # (0.105 - 1, 0, 0.25) and (2.98 - 3, 0, -5 + 0.75).
    def ce(l0: float, l2: float) -> float:
        return math.log(1 + math.exp(-l0) * (1 + math.exp(l2)))
    assert pool.loss.tolist() == pytest.approx([ce(0.105, 0.0), ce(2.98, -5.0), ce(-0.895, 0.25), ce(-0.02, -4.25)],
                                               rel=1e-4)
    # The unconfident row's clean loss (1.03) is above the confident row's minimum adversarial loss (0.71):
    # a correct prediction of three classes may have p_y below 1/2, a wrong one p_y just under 1/2.
    assert pool.selected.tolist() == selected
    assert pool.n_selected_min_adv == sum(i >= 2 for i in selected)


def test_fig8_pool_is_empty_when_no_row_flips_at_a_positive_radius():
    model, x, y = three_class_linear()
    pool = minimum_adversarial_pool(model, x[2:], y[2:], GRID, 0.5)
    assert pool.rows.numel() == pool.loss.numel() == pool.selected.numel() == pool.n_selected_min_adv == 0
    with pytest.raises(ValueError, match=r"`p_up` must be in \(0, 1\], got 0"):
        minimum_adversarial_pool(model, x, y, GRID, 0)
    with pytest.raises(ValueError, match=r"`scoring_mode` must be one of .*got 'test'"):
        minimum_adversarial_pool(model, x, y, GRID, 0.5, scoring_mode="test")


@pytest.mark.parametrize("max_train_rows,want", [
    (None, {"train_rows": 4, "train_misclassified": 1, "train_unflipped": 1, "pool_size": 4, "selected": 2,
            "selected_min_adv": 1}),
    (2, {"train_rows": 2, "train_misclassified": 0, "train_unflipped": 0, "pool_size": 4, "selected": 2,
         "selected_min_adv": 1}),
    (3, {"train_rows": 3, "train_misclassified": 1, "train_unflipped": 0, "pool_size": 4, "selected": 2,
         "selected_min_adv": 1}),
])
def test_fig8_callback_counts_the_rows_it_leaves_out_of_the_pool(tmp_path, max_train_rows, want):
    model, x, y = three_class_linear()
    module = AdversarialSelectionModule(model, recipe="ds", p_up=0.5, num_classes=3,
                                        train_attack=AttackConfig(eps=0.05, alpha=0.05, steps=1),
                                        eval_attack=AttackConfig(eps=0.05, alpha=0.05, steps=1),
                                        optimizer=functools.partial(torch.optim.SGD, lr=0.0))  # weights fixed
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)
    probe = MinimumPerturbation(probe_size=4, max_eps=0.1, num_eps=4, steps=5, max_train_rows=max_train_rows)
    t = trainer(tmp_path, [probe], max_epochs=1)
    t.fit(module, loader, loader)
    row = probe.history[-1]
    assert {k: row[k] for k in want} == want
    metrics = {k: float(v) for k, v in t.callback_metrics.items()}
    assert metrics["minperturb/selected_min_adv_frac"] == pytest.approx(0.5)
    n = want["train_rows"]
    assert metrics["minperturb/train_misclassified_frac"] == pytest.approx(want["train_misclassified"] / n)
    assert metrics["minperturb/train_unflipped_frac"] == pytest.approx(want["train_unflipped"] / n)
    assert row["minperturb/selected_min_adv_frac"] == metrics["minperturb/selected_min_adv_frac"]


def test_fig8_share_is_not_logged_when_no_training_row_is_in_a_pool(tmp_path):
    model, x, y = three_class_linear()
    module = AdversarialSelectionModule(model, recipe="ds", num_classes=3, optimizer=functools.partial(
        torch.optim.SGD, lr=0.0), train_attack=AttackConfig(eps=0.05, alpha=0.05, steps=1))
    probe = MinimumPerturbation(probe_size=2, max_eps=0.1, num_eps=4, steps=2)
    rows = DataLoader(TensorDataset(x[2:], y[2:]), batch_size=2)  # misclassified and out of reach only
    trainer(tmp_path, [probe], max_epochs=1).fit(module, rows, rows)
    assert "minperturb/selected_min_adv_frac" not in probe.history[-1]
    assert probe.history[-1]["minperturb/train_misclassified_frac"] == 0.5
    assert probe.history[-1]["selected"] == 0


# ------------------------------------------------------------------------------------ dashboard end to end
@pytest.mark.slow
def test_adaptive_config_writes_every_tag_in_range_and_the_four_figures(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_advsel.cli import build_cli

    cli = build_cli(["fit", *config_args("digits/base.yaml", "recipes/ds_adaptive.yaml", "callbacks/dashboards.yaml"),
                     "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3",
                     "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
                     "--model.init_args.train_attack.steps", "2", "--model.init_args.eval_attack.steps", "2",
                     "--trainer.logger.init_args.save_dir", str(tmp_path)])
    log_dir = Path(cli.trainer.log_dir)
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    scalars = {tag: [e.value for e in events.Scalars(tag)] for tag in tags["scalars"]}
    fractions = ["train/p_up", "train/acc", "val/acc_clean", "val/acc_robust", "train/selected_adv_frac",
                 "minperturb/robust_frac_at_train_eps", "minperturb/unflipped_frac",
                 "minperturb/train_misclassified_frac", "minperturb/train_unflipped_frac"
                 ] + [f"selection/class_{c}/adv_frac" for c in range(10)]
    for tag in fractions:
        assert tag in scalars, f"{tag} missing; logged: {sorted(scalars)}"
        assert all(0 <= v <= 1 for v in scalars[tag]), (tag, scalars[tag])
    # Two short epochs leave a near-constant classifier: its last batch may have no row flipped at a positive
    # radius, and then there is no pool to select from and no share to log.
    pools = [h["pool_size"] for cb in cli.trainer.callbacks if isinstance(cb, MinimumPerturbation) for h in cb.history]
    assert len(scalars.get("minperturb/selected_min_adv_frac", [])) == sum(n > 0 for n in pools)
    assert all(0 <= v <= 1 for v in scalars.get("minperturb/selected_min_adv_frac", []))
    assert scalars["train/p_up"][0] == 1.0 and len(scalars["train/p_up"]) == 2
    assert scalars["train/p_up"][1] == pytest.approx(max(0.1, 1 - scalars["train/acc"][0]))
    assert all(v >= 0 and v == int(v) for tag in ("selection/n_clean", "selection/n_adv") for v in scalars[tag])
    for tag in ("minperturb/mean", "minperturb/median"):
        assert all(0 <= v <= 0.2 for v in scalars[tag]), (tag, scalars[tag])
    assert "minperturb/eps" in tags["histograms"]
    names = ("p_up", "selection_makeup", "min_perturbation", "accuracy")
    assert sorted(tags["images"]) == sorted(f"figures/{n}" for n in names)
    for name in names:
        path = log_dir / "figures" / f"{name}.png"
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100
            assert len(set(image.convert("L").getdata())) > 2  # something drawn, not a blank canvas


def test_probe_runs_every_n_epochs_and_after_the_last_on_a_fixed_probe(tmp_path, monkeypatch):
    train, val = loaders()
    probe = MinimumPerturbation(probe_size=10, every_n_epochs=2, num_eps=4, steps=2)
    t = trainer(tmp_path, [probe], max_epochs=3, limit_val_batches=1)
    printed: list[str] = []
    monkeypatch.setattr("lightning_advsel.callbacks.min_perturbation.rank_zero_info", printed.append)
    t.fit(make_module(), train, val)
    assert [h["epoch"] for h in probe.history] == [1, 2]
    assert probe.max_eps == pytest.approx(0.2) and probe.norm == "linf"  # twice the training eps, its norm
    for h in probe.history:
        assert len(h["eps"]) == 10
        assert all(e == 0 or any(math.isclose(e, r, rel_tol=1e-6) for r in (0.05, 0.1, 0.15, 0.2)) for e in h["eps"])
    assert any("probe 10 validation samples, 4 radii up to 0.2" in m and "16 rows of the epoch's last training batch"
               in m for m in printed)
