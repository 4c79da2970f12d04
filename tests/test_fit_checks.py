"""The fit-start refusals as functions of stand-in Trainers and real networks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import TinyNet
from lightning.pytorch.callbacks import StochasticWeightAveraging
from torch import nn

from lightning_advsel import fit_checks


def test_the_trainers_clipping_and_accumulation_are_refused_naming_the_modules_arguments():
    fit_checks.refuse_trainer_settings(SimpleNamespace(gradient_clip_val=None, accumulate_grad_batches=1), "M")
    with pytest.raises(ValueError, match=r"`Trainer\(gradient_clip_val=1.0\)` does not apply to M.*"
                                         r"`model.init_args.gradient_clip_val: 1.0`"):
        fit_checks.refuse_trainer_settings(SimpleNamespace(gradient_clip_val=1.0, accumulate_grad_batches=1), "M")
    with pytest.raises(ValueError, match=r"M\(accumulate_grad_batches=4\)"):
        fit_checks.refuse_trainer_settings(SimpleNamespace(gradient_clip_val=0, accumulate_grad_batches=4), "M")


def test_sync_batchnorm_is_refused_under_the_global_scope_only():
    model = nn.Sequential(nn.Linear(2, 2), nn.SyncBatchNorm(2))
    fit_checks.refuse_sync_batchnorm("local", model)
    with pytest.raises(ValueError, match=r"`selection_scope`='global'.*SyncBatchNorm"):
        fit_checks.refuse_sync_batchnorm("global", model)


def test_weight_averaging_is_refused_on_a_network_with_batchnorm_only():
    trainer = SimpleNamespace(callbacks=[StochasticWeightAveraging(swa_lrs=0.1)])
    fit_checks.refuse_weight_averaging(trainer, TinyNet(), "M")
    with pytest.raises(ValueError, match=r"`StochasticWeightAveraging` recomputes BatchNorm statistics.*EMAWeight"):
        fit_checks.refuse_weight_averaging(trainer, TinyNet(batchnorm=True), "M")


def test_an_empty_training_loader_is_refused_unless_the_fit_resumes():
    empty = dict(limit_train_batches=1.0, estimated_stepping_batches=0, num_training_batches=0)
    with pytest.raises(ValueError, match=r"the training data loader yields no batches"):
        fit_checks.refuse_empty_training(SimpleNamespace(ckpt_path=None, **empty))
    fit_checks.refuse_empty_training(SimpleNamespace(ckpt_path="last.ckpt", **empty))


def test_a_plateau_scheduler_needs_a_monitor_an_epoch_interval_and_its_validation():
    from lightning.pytorch.cli import ReduceLROnPlateau

    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    validating = SimpleNamespace(limit_val_batches=1)
    with pytest.raises(ValueError, match=r"needs the metric it follows, got monitor=None"):
        fit_checks.refuse_unmonitored_plateau(torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer), "epoch",
                                              validating)
    plateau = ReduceLROnPlateau(optimizer, monitor="val/acc_robust", mode="max")
    fit_checks.refuse_unmonitored_plateau(plateau, "epoch", validating)
    with pytest.raises(ValueError, match=r"`scheduler_interval` must be 'epoch'.*got 'step'"):
        fit_checks.refuse_unmonitored_plateau(plateau, "step", validating)
    with pytest.raises(ValueError, match=r"runs no validation"):
        fit_checks.refuse_unmonitored_plateau(plateau, "epoch", SimpleNamespace(limit_val_batches=0))


def test_a_checkpoint_of_another_architecture_is_refused_naming_keys_and_shapes():
    own = {"model.w": torch.zeros(2, 3), "model.b": torch.zeros(2)}
    fit_checks.refuse_other_architecture(own, {"other": torch.zeros(1)}, "Net")  # no model weights: nothing to check
    with pytest.raises(ValueError, match=r"missing keys \[model.b\], unexpected keys \[model.c\], "
                                         r"shape mismatches \[model.w: checkpoint \(4, 3\), model \(2, 3\)\]"):
        fit_checks.refuse_other_architecture(own, {"model.w": torch.zeros(4, 3), "model.c": torch.zeros(1)}, "Net")
