"""The optimizer, the learning-rate scheduler and the learning rate of a manually optimized module.

:class:`Optimization` builds what ``configure_optimizers`` returns from the module's factories, and
:func:`step_scheduler` steps the scheduler that the Trainer holds, which under manual optimization is the module's
job: every ``"step"`` after an optimizer step, every ``"epoch"`` at the epoch's end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal, get_args

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from lightning_advsel import checks, schedules
from lightning_advsel.fit_checks import refuse_unmonitored_plateau

Interval = Literal["epoch", "step"]


class Optimization:
    """The optimizer and scheduler factories, how often the scheduler steps, and a learning rate set on the module.

    Args:
        optimizer: optimizer factory, called with the model parameters.
        lr_scheduler: optional scheduler factory, called with the optimizer.
        interval: step the scheduler every ``"epoch"`` or every ``"step"``.

    Raises:
        ValueError: for an unknown ``interval``.
    """

    def __init__(self, optimizer: OptimizerCallable, lr_scheduler: LRSchedulerCallable | None = None,
                 interval: Interval = "epoch") -> None:
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.interval = checks.check_choice("scheduler_interval", interval, get_args(Interval))
        self.lr_set: float | None = None  # the optimizer's learning rate when set (`lr`), else the factory's

    @property
    def lr(self) -> float:
        """The learning rate the optimizer starts from: the one set here, else the ``optimizer`` factory's.

        Raises:
            ValueError: when set to anything but a finite number > 0.
        """
        if self.lr_set is not None:
            return self.lr_set
        return float(self.optimizer_factory([nn.Parameter(torch.zeros(1))]).param_groups[0]["lr"])

    @lr.setter
    def lr(self, value: float) -> None:
        self.lr_set = checks.check_number("lr", value, 0.0, strict=True)

    def configure(self, params: Iterable[nn.Parameter], trainer: Any,
                  optimizer_steps: Callable[[], int | float], window: int) -> Any:
        """What ``configure_optimizers`` returns: the optimizer, and with a scheduler Lightning's dict.

        Args:
            params: the parameters to optimize.
            trainer: the fit's Trainer (``None`` outside one), for the checks of a plateau scheduler.
            optimizer_steps: the fit's optimizer steps, asked only by a schedule that spans the run.
            window: batches per optimizer step (``accumulate_grad_batches``).

        Raises:
            ValueError: for a ``ReduceLROnPlateau`` without a monitor this fit logs
                (:func:`~lightning_advsel.fit_checks.refuse_unmonitored_plateau`), or a run-length schedule in a
                run without an end.
        """
        optimizer = self.optimizer_factory(params)
        if self.lr_set is not None:
            for group in optimizer.param_groups:
                group["lr"] = self.lr_set
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            refuse_unmonitored_plateau(scheduler, self.interval, trainer)
        if isinstance(scheduler, schedules.RunLengthSchedule):
            scheduler.set_length(self.schedule_length(optimizer_steps(), trainer.num_training_batches, window))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.interval}}

    def schedule_length(self, steps: int | float, batches: int | float, window: int) -> int:
        """The ``step()`` calls of a fit's scheduler: its optimizer ``steps``, or its epochs of ``batches``.

        Raises:
            ValueError: for a run without an end (no ``max_epochs`` or ``max_steps``, or an endless data set).
        """
        if steps == float("inf") or (self.interval == "epoch" and batches == float("inf")):
            raise ValueError("a schedule of lightning_advsel.schedules spans the whole run, but this run has no end: "
                             "set the Trainer's `max_steps` or `max_epochs`")
        if self.interval == "step":
            return int(steps)
        return math.ceil(steps / math.ceil(batches / window))


def step_scheduler(trainer: Any, interval: str) -> None:
    """Step the scheduler the Trainer holds if it runs every ``interval``: the module's, or the one
    ``Tuner.lr_find`` puts in its place for its search, which runs every step.

    Raises:
        ValueError: for a ``ReduceLROnPlateau`` whose monitor this run does not log.
    """
    configs = trainer.lr_scheduler_configs
    if not configs or configs[0].interval != interval:
        return
    scheduler = configs[0].scheduler
    if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step()
        return
    # At the epoch's end, after its validation: the value every rank logged (synced), so all ranks agree.
    value = trainer.callback_metrics.get(scheduler.monitor)
    if value is None:
        raise ValueError(f"`lr_scheduler` ReduceLROnPlateau follows monitor={scheduler.monitor!r}, which this "
                         f"run does not log; logged: {sorted(trainer.callback_metrics)}")
    scheduler.step(float(value))
