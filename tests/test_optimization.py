"""Optimization and step_scheduler without a Trainer."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_advsel.optimization import Optimization, step_scheduler


def test_the_learning_rate_is_the_factorys_until_set_and_then_the_optimizers():
    optimization = Optimization(partial(torch.optim.SGD, lr=0.3))
    assert optimization.lr == 0.3 and optimization.lr_set is None
    optimization.lr = 0.05
    optimizer = optimization.configure(nn.Linear(2, 2).parameters(), None, lambda: 10, 1)
    assert optimizer.param_groups[0]["lr"] == 0.05
    with pytest.raises(ValueError, match=r"`lr` must be a finite number > 0.0, got 0"):
        optimization.lr = 0


def test_a_scheduler_comes_with_its_interval_and_an_unknown_interval_is_refused():
    optimization = Optimization(partial(torch.optim.SGD, lr=0.1),
                                partial(torch.optim.lr_scheduler.StepLR, step_size=1), "step")
    configured = optimization.configure(nn.Linear(2, 2).parameters(), None, lambda: 10, 1)
    assert configured["lr_scheduler"]["interval"] == "step"
    with pytest.raises(ValueError, match=r"`scheduler_interval` must be one of \('epoch', 'step'\), got 'batch'"):
        Optimization(torch.optim.SGD, None, "batch")


def test_a_run_length_schedule_counts_optimizer_steps_or_epochs_and_needs_an_end():
    assert Optimization(torch.optim.SGD, None, "step").schedule_length(40, 10, 3) == 40
    assert Optimization(torch.optim.SGD, None, "epoch").schedule_length(20, 10, 3) == 5  # 4 windows per epoch
    with pytest.raises(ValueError, match=r"this run has no end"):
        Optimization(torch.optim.SGD, None, "step").schedule_length(float("inf"), 10, 1)


def test_step_scheduler_steps_only_its_interval_and_a_plateau_needs_its_logged_monitor():
    from lightning.pytorch.cli import ReduceLROnPlateau

    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    plateau = ReduceLROnPlateau(optimizer, monitor="val/acc_robust", mode="max")
    trainer = SimpleNamespace(lr_scheduler_configs=[SimpleNamespace(interval="epoch", scheduler=plateau)],
                              callback_metrics={"train/acc": torch.tensor(0.5)})
    step_scheduler(trainer, "step")  # not its interval: nothing read
    with pytest.raises(ValueError, match=r"'val/acc_robust', which this run does not log; logged: \['train/acc'\]"):
        step_scheduler(trainer, "epoch")
    trainer.callback_metrics["val/acc_robust"] = torch.tensor(0.25)
    step_scheduler(trainer, "epoch")
    assert plateau.best == 0.25
