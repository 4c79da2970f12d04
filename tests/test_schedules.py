"""Schedules whose length is the run's: pure functions of the progress, fitted to the run by the module."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import TinyNet, config_args, tiny_batch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ReduceLROnPlateau
from torch.utils.data import DataLoader, TensorDataset

from lightning_advsel import AdversarialSelectionModule, AttackConfig
from lightning_advsel import module as module_file
from lightning_advsel.cli import build_cli
from lightning_advsel.schedules import Cosine, OneCycle, cosine_factor, one_cycle_factor, warmup_factor

LR = 0.1


def test_cosine_runs_from_one_down_to_its_final_factor():
    values = [cosine_factor(i / 10, final_factor=0.2) for i in range(11)]
    assert values[0] == 1 and values[-1] == pytest.approx(0.2) and values[5] == pytest.approx(0.6)
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    assert cosine_factor(1.5, final_factor=0.2) == values[-1]  # past the end it stays there


def test_one_cycle_rises_to_one_at_its_peak_then_falls_to_its_final_factor():
    def f(p: float) -> float:
        return one_cycle_factor(p, peak=0.25, start_factor=0.1, final_factor=0.01)

    rise, fall = [f(i / 20) for i in range(6)], [f(i / 20) for i in range(5, 21)]
    assert rise[0] == pytest.approx(0.1) and fall[0] == 1 and fall[-1] == pytest.approx(0.01)
    assert all(a < b for a, b in zip(rise, rise[1:], strict=False))
    assert all(a > b for a, b in zip(fall, fall[1:], strict=False))


def test_a_schedule_without_a_length_refuses_to_step():
    scheduler = Cosine(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR))
    with pytest.raises(RuntimeError, match=r"Cosine has no length.*set_length"):
        scheduler.step()


@pytest.mark.parametrize("schedule", [Cosine, OneCycle])
@pytest.mark.parametrize("interval,accumulate", [("epoch", 1), ("step", 1), ("step", 3), ("epoch", 3)])
def test_the_lr_reaches_the_final_factor_exactly_when_training_ends(tmp_path, schedule, interval, accumulate):
    torch.manual_seed(0)
    module = AdversarialSelectionModule(
        TinyNet(), recipe="ds", train_attack=AttackConfig(eps=0.1, alpha=0.05, steps=1, mode="train"),
        optimizer=lambda p: torch.optim.SGD(p, lr=LR), lr_scheduler=lambda o: schedule(o, final_factor=0.05),
        scheduler_interval=interval, accumulate_grad_batches=accumulate)
    x, y = tiny_batch(56)
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=3, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))  # 7 batches an epoch
    scheduler = module.lr_schedulers()
    steps = 3 * (7 if accumulate == 1 else 3)
    assert scheduler.length == scheduler.last_epoch == (3 if interval == "epoch" else steps)
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(LR * 0.05)


def test_the_schedule_overlays_parse_over_a_base_with_its_own_scheduler(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, cls in (("cosine", Cosine), ("one_cycle", OneCycle)):
        cli = build_cli([*config_args("digits/base.yaml", "recipes/ds.yaml", f"schedules/{name}.yaml"),
                         "--trainer.logger", "false"], run=False)
        assert cli.model.scheduler_interval == "step"
        assert isinstance(cli.model.lr_scheduler_factory(torch.optim.SGD(cli.model.parameters(), lr=LR)), cls)
    cli = build_cli([*config_args("digits/base.yaml", "recipes/ds.yaml", "schedules/plateau.yaml"),
                     "--trainer.logger", "false"], run=False)
    plateau = cli.model.lr_scheduler_factory(torch.optim.SGD(cli.model.parameters(), lr=LR))
    assert isinstance(plateau, ReduceLROnPlateau) and cli.model.scheduler_interval == "epoch"
    assert (plateau.monitor, plateau.mode, plateau.factor, plateau.patience) == ("val/acc_robust", "max", 0.5, 3)


def test_the_warmup_factor_rises_linearly_to_one_and_stays_there():
    assert [warmup_factor(e, 2.0) for e in (0.25, 0.5, 1.0, 2.0, 3.5)] == [0.125, 0.25, 0.5, 1.0, 1.0]
    assert warmup_factor(0.25, 0.0) == 1.0  # no warm-up: the full radius from the first batch


EPS, ALPHA = 0.1, 0.05  # pixels
STEP = module_file.adversarial_step


def _ramped(tmp_path, monkeypatch, epochs: int, ckpt_path=None, **kwargs) -> tuple[AdversarialSelectionModule, list]:
    """Fit 4 batches an epoch with a 1.5-epoch radius ramp; the (eps, alpha) every training step was given."""
    seen = []

    def spy(model, x, y, settings, *args, **kwargs):
        seen.append((settings.train_attack.eps, settings.train_attack.alpha))
        return STEP(model, x, y, settings, *args, **kwargs)

    monkeypatch.setattr(module_file, "adversarial_step", spy)
    torch.manual_seed(0)
    module = AdversarialSelectionModule(TinyNet(), recipe="robust", eps_warmup_epochs=1.5,
                                        train_attack=AttackConfig(eps=EPS, alpha=ALPHA, steps=1, mode="train"),
                                        eval_attack=AttackConfig(eps=EPS, alpha=ALPHA, steps=1), **kwargs)
    x, y = tiny_batch(16)
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=epochs, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4), ckpt_path=ckpt_path)
    if ckpt_path is None:
        trainer.save_checkpoint(tmp_path / f"epochs{epochs}.ckpt")
    return module, seen


def test_eps_warmup_ramps_the_training_radius_and_step_batch_by_batch_and_leaves_the_settings_alone(
        tmp_path, monkeypatch):
    module, seen = _ramped(tmp_path, monkeypatch, epochs=3)
    factors = [min(1.0, (i + 1) / 4 / 1.5) for i in range(12)]  # 4 batches an epoch, 1.5 epochs
    assert seen == [pytest.approx((EPS * f, ALPHA * f)) for f in factors]
    assert factors[5] == 1 and factors[4] < 1  # the ramp ends at the middle of the second epoch
    assert module.settings.train_attack.eps == EPS and module.eval_attack.eps == EPS  # evaluation: full radius
    assert float(module.trainer.callback_metrics["train/eps"]) == pytest.approx(EPS)  # the last step's, logged


def test_a_run_resumed_inside_the_eps_warmup_continues_the_ramp(tmp_path, monkeypatch):
    _, whole = _ramped(tmp_path / "whole", monkeypatch, epochs=2)
    _ramped(tmp_path / "first", monkeypatch, epochs=1)
    _, resumed = _ramped(tmp_path / "again", monkeypatch, epochs=2, ckpt_path=tmp_path / "first" / "epochs1.ckpt")
    assert resumed == whole[4:]
    assert resumed[0][0] < EPS  # the resumed epoch starts inside the ramp


def test_the_eps_warmup_overlay_parses_over_a_base_and_a_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli([*config_args("digits/base.yaml", "recipes/robust.yaml", "schedules/eps_warmup.yaml"),
                     "--trainer.logger", "false"], run=False)
    assert cli.model.eps_warmup_epochs == 5 and cli.model.settings.recipe == "robust"


@pytest.mark.parametrize("bad", [-0.5, float("nan"), "two"])
def test_a_bad_eps_warmup_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=r"`eps_warmup_epochs` must be a finite number >= 0.0 \(epochs\)"):
        AdversarialSelectionModule(TinyNet(), eps_warmup_epochs=bad)


def _plateau(**kwargs) -> AdversarialSelectionModule:
    torch.manual_seed(0)
    return AdversarialSelectionModule(
        TinyNet(), recipe="ds", train_attack=AttackConfig(eps=0.1, alpha=0.05, steps=1, mode="train"),
        eval_attack=AttackConfig(eps=0.1, alpha=0.05, steps=1), optimizer=lambda p: torch.optim.SGD(p, lr=LR),
        **kwargs)


def _plateau_fit(tmp_path, module, ckpt_path=None, **trainer_kwargs) -> L.Trainer:
    trainer_kwargs.setdefault("max_epochs", 2)
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, **trainer_kwargs)
    train = DataLoader(TensorDataset(*tiny_batch(32)), batch_size=8)
    trainer.fit(module, train, DataLoader(TensorDataset(*tiny_batch(16, seed=1)), batch_size=16),
                ckpt_path=ckpt_path)
    return trainer


def test_reduce_lr_on_plateau_follows_its_monitored_metric_each_epoch_and_resumes(tmp_path):
    # Patience 0: the lr halves after each epoch whose validation loss is not below the best one before it.
    def plateau(optimizer):
        return ReduceLROnPlateau(optimizer, monitor="val/loss_clean", mode="min", factor=0.5, patience=0,
                                 threshold=0.0, threshold_mode="abs")

    class Record(L.Callback):
        def __init__(self):
            self.values = []

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self.values.append(float(trainer.callback_metrics["val/loss_clean"]))

    record, module = Record(), _plateau(lr_scheduler=plateau)
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    _plateau_fit(tmp_path, module, callbacks=[record, every_epoch], max_epochs=4)
    values, scheduler = record.values, module.lr_schedulers()
    worse = sum(value >= min(values[:i]) for i, value in enumerate(values) if i > 0)
    assert len(values) == 4 and scheduler.best == min(values)
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(LR * 0.5**worse)
    # A run resumed after its first epoch goes on with the scheduler's state (best value, bad epochs).
    resumed = _plateau(lr_scheduler=plateau)
    _plateau_fit(tmp_path / "again", resumed, ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt", max_epochs=4)
    assert resumed.optimizers().param_groups[0]["lr"] == module.optimizers().param_groups[0]["lr"]
    assert resumed.lr_schedulers().state_dict() == scheduler.state_dict()
    for a, b in zip(module.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("scheduler,kwargs,message", [
    (lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o), {},
     r"`lr_scheduler` ReduceLROnPlateau needs the metric it follows, got monitor=None: use "
     r"lightning.pytorch.cli.ReduceLROnPlateau"),
    (lambda o: ReduceLROnPlateau(o, monitor="val/acc_robust"), {"scheduler_interval": "step"},
     r"`scheduler_interval` must be 'epoch' for ReduceLROnPlateau .*got 'step'"),
])
def test_a_plateau_schedule_without_its_metric_or_per_step_is_refused_before_training(tmp_path, scheduler, kwargs,
                                                                                      message):
    module = _plateau(lr_scheduler=scheduler, **kwargs)
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match=message):
        _plateau_fit(tmp_path, module)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def test_a_plateau_schedule_on_validation_without_validation_or_on_an_unlogged_metric_is_refused(tmp_path):
    module = _plateau(lr_scheduler=lambda o: ReduceLROnPlateau(o, monitor="val/acc_robust"))
    with pytest.raises(ValueError, match=r"follows monitor='val/acc_robust', but this fit runs no validation"):
        _plateau_fit(tmp_path, module, limit_val_batches=0)
    assert module.trainer.global_step == 0
    module = _plateau(lr_scheduler=lambda o: ReduceLROnPlateau(o, monitor="val/acc_robustt"))
    with pytest.raises(ValueError, match=r"follows monitor='val/acc_robustt', which this run does not log; logged: "
                                         r"\[.*'val/acc_robust'"):
        _plateau_fit(tmp_path, module)
