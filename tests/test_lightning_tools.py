"""Lightning's own tools on the module: the learning-rate and batch-size finders, weight averaging, the
learning-rate monitor and early stopping."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from conftest import TinyNet, fit_steps, tiny_batch
from lightning.pytorch.callbacks import (
    EarlyStopping,
    EMAWeightAveraging,
    LearningRateMonitor,
    ModelCheckpoint,
    StochasticWeightAveraging,
)
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.tuner import Tuner
from torch.utils.data import DataLoader, TensorDataset

from lightning_advsel import AdversarialSelectionModule, AttackConfig
from lightning_advsel.callbacks import MinimumPerturbation
from lightning_advsel.data import DigitsDataModule

ATTACK = AttackConfig(eps=0.1, alpha=0.05, steps=2, random_start=False, mode="train")


def make(recipe="ds", net=None, **kwargs):
    torch.manual_seed(0)
    return AdversarialSelectionModule(net or TinyNet(), recipe=recipe, train_attack=ATTACK, eval_attack=None,
                                      optimizer=lambda p: torch.optim.SGD(p, lr=0.1), **kwargs)


def trainer_for(tmp_path, **kwargs) -> L.Trainer:
    kwargs.setdefault("max_epochs", 1)
    return L.Trainer(default_root_dir=tmp_path, limit_val_batches=0, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_lr_find_sweeps_the_rate_and_the_next_fit_starts_from_its_suggestion(tmp_path):
    # The module optimizes manually, so it steps the scheduler the Trainer holds: the finder's per-step one during
    # the search (this module's own schedule runs per epoch), its own again afterwards.
    x, y = tiny_batch(80)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # 20 batches
    module = make("ds", lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5))
    assert module.lr == 0.1  # the optimizer factory's until set
    trainer = trainer_for(tmp_path)
    finder = Tuner(trainer).lr_find(module, train_dataloaders=loader, min_lr=1e-4, max_lr=1.0, num_training=20,
                                    early_stop_threshold=None)
    lrs = finder.results["lr"]
    assert len(lrs) == 20 and lrs[0] == pytest.approx(1e-4) and lrs[-1] > 0.5
    assert all(later > earlier for earlier, later in zip(lrs[:-1], lrs[1:], strict=True))
    assert finder.suggestion() is not None and module.lr == finder.suggestion()
    trainer.fit(module, loader)
    # Built with the suggestion, then one epoch of the module's own schedule: one halving.
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(finder.suggestion() * 0.5)


def test_scale_batch_size_sets_the_data_modules_batch_and_the_next_fit_runs_whole_epochs(tmp_path):
    # The finder restores a checkpoint taken before its trials; the data module's resumable position in it must
    # not make the next fit skip batches.
    dm = DigitsDataModule(batch_size=2, val_size=800, test_size=800)  # 197 training images
    module = make("ds")
    trainer = trainer_for(tmp_path)
    found = Tuner(trainer).scale_batch_size(module, datamodule=dm, mode="power", steps_per_trial=1, max_trials=3)
    assert found == dm.batch_size == 8  # 2, 4, 8: every trial fits on this machine
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == trainer.num_training_batches == math.ceil(len(dm.train_set) / 8)


def test_a_learning_rate_set_on_the_module_is_checked_and_kept_by_its_checkpoint(tmp_path):
    module = make("ds")
    for bad in (0, -0.1, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match=r"`lr` must be a finite number > 0.0, got"):
            module.lr = bad
    assert module.lr == 0.1
    module.lr = 0.02
    trainer = fit_steps(module, *tiny_batch(16), tmp_path)
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.02
    trainer.save_checkpoint(tmp_path / "set.ckpt")
    # Built from Python, the optimizer factory is not in the checkpoint: the reloaded one would use Adam's 0.001.
    assert AdversarialSelectionModule(TinyNet()).lr == 0.001
    assert AdversarialSelectionModule.load_from_checkpoint(tmp_path / "set.ckpt", model=TinyNet()).lr == 0.02


def test_ema_weight_averaging_updates_once_per_optimizer_step_and_the_module_ends_with_the_average(tmp_path):
    x, y = tiny_batch(32)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)  # 4 batches
    module = make("ds", accumulate_grad_batches=2)  # 2 optimizer steps an epoch
    ema = EMAWeightAveraging(decay=0.5)
    trainer = trainer_for(tmp_path, max_epochs=2, callbacks=[ema])
    trainer.fit(module, loader)
    assert trainer.global_step == 4 and int(ema._average_model.n_averaged) == 4
    for averaged, trained in zip(ema._average_model.module.parameters(), module.parameters(), strict=True):
        assert torch.equal(averaged, trained)


def test_stochastic_weight_averaging_is_refused_with_batchnorm_and_trains_no_extra_epoch_without(tmp_path):
    x, y = tiny_batch(32)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)  # 4 batches
    plain = make("ds")
    trainer = trainer_for(tmp_path, max_epochs=3, callbacks=[StochasticWeightAveraging(0.05, swa_epoch_start=1)])
    trainer.fit(plain, loader)
    assert trainer.global_step == 12 and plain.batches_trained == 12
    # With BatchNorm its extra statistics epoch would train the averaged weights: refused before any step.
    normed = make("ds", net=TinyNet(batchnorm=True))
    before = [p.detach().clone() for p in normed.parameters()]
    trainer = trainer_for(tmp_path, max_epochs=3, callbacks=[StochasticWeightAveraging(0.05, swa_epoch_start=1)])
    with pytest.raises(ValueError, match=r"`StochasticWeightAveraging` recomputes BatchNorm .*EMAWeightAveraging"):
        trainer.fit(normed, loader)
    assert trainer.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, normed.parameters(), strict=True))


def test_a_run_with_ema_weight_averaging_resumes_exactly(tmp_path):
    # The checkpoint holds the average as `state_dict` and the trained weights apart: the resumed run must go on
    # from the trained ones, with the average and the module's own state (selection counts) where they were.
    x, y = tiny_batch(32)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)  # 4 batches

    def run(ckpt_path=None):
        module, ema = make("ds"), EMAWeightAveraging(decay=0.5)
        every_epoch = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
        trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=2, limit_val_batches=0, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[ema, every_epoch])
        trainer.fit(module, loader, ckpt_path=ckpt_path)
        return module, ema

    straight, straight_ema = run()
    resumed, resumed_ema = run(tmp_path / "ckpt" / "epoch=0.ckpt")  # saved after the first of two epochs
    assert int(resumed_ema._average_model.n_averaged) == int(straight_ema._average_model.n_averaged) == 8
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):  # both hold the average now
        assert torch.equal(a, b)
    assert resumed.batches_trained == straight.batches_trained == 8


def test_minimum_perturbation_probes_the_trained_weights_while_validation_sees_the_average(tmp_path):
    # Averaging does not change training, so the radii measured at epoch end equal a run without it; the
    # validation accuracy does change, because Lightning swaps the average in for the validation loop.
    x, y = tiny_batch(32)
    train = DataLoader(TensorDataset(x, y), batch_size=8)
    val = DataLoader(TensorDataset(*tiny_batch(16, seed=1)), batch_size=16)

    def run(*callbacks):
        module, probe = make("ds"), MinimumPerturbation(probe_size=16, num_eps=4, steps=2, max_train_rows=8)
        trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=2, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[*callbacks, probe])
        trainer.fit(module, train, val)
        return probe.history, trainer.callback_metrics["val/loss_clean"]

    plain_history, plain_val_loss = run()
    averaged_history, averaged_val_loss = run(EMAWeightAveraging(decay=0.9))
    assert len(plain_history) == 2 and averaged_history == plain_history
    assert averaged_val_loss != plain_val_loss


def test_learning_rate_monitor_logs_the_module_schedule_and_early_stopping_ends_the_fit(tmp_path):
    # Under manual optimization Lightning steps nothing itself: the monitor reads the scheduler the module steps.
    class Rates(DummyLogger):
        def __init__(self):
            super().__init__()
            self.rates = []

        def log_metrics(self, metrics, step=None):
            self.rates += [value for name, value in metrics.items() if name == "lr-SGD"]

    x, y = tiny_batch(32)
    module = make("ds", lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5))
    rates = Rates()
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=3, logger=rates, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[LearningRateMonitor(logging_interval="epoch")])
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    assert rates.rates == [0.1, 0.05, 0.025]
    # Patience 0 and an improvement no epoch can make: the fit stops after its second epoch of 20.
    stop = EarlyStopping("val/loss_clean", mode="min", patience=0, min_delta=10.0)
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=20, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[stop])
    trainer.fit(make("ds"), DataLoader(TensorDataset(x, y), batch_size=8),
                DataLoader(TensorDataset(*tiny_batch(16, seed=1)), batch_size=16))
    assert trainer.current_epoch == 2 and stop.stopped_epoch == 1
