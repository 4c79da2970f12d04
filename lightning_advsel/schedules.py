"""Learning-rate schedules whose length is the run's: written once in a config, never a copied step count.

A schedule is a pure function of the progress through training, a number in [0, 1], to a factor on the
optimizer's learning rate (:meth:`RunLengthSchedule.factor`). :class:`~lightning_advsel.AdversarialSelectionModule`
sets its length at ``configure_optimizers``: the run's optimizer steps under ``scheduler_interval: step``
(``trainer.estimated_stepping_batches`` counted with the module's ``accumulate_grad_batches``), its epochs under
``scheduler_interval: epoch``. So the learning rate reaches ``final_factor`` as training ends, whatever
``max_epochs``, ``max_steps``, batch size or accumulation::

    lr_scheduler:
      class_path: lightning_advsel.schedules.Cosine
      init_args:
        final_factor: 0.0            # of the optimizer's lr, at the end of training

Outside the module, call :meth:`RunLengthSchedule.set_length` before the first ``step()``.

:func:`warmup_factor` is the training attack's radius ramp (the module's ``eps_warmup_epochs``), a pure function of
the epochs trained.
"""

from __future__ import annotations

import math
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from lightning_advsel import checks

__all__ = ["Cosine", "OneCycle", "RunLengthSchedule", "cosine_factor", "one_cycle_factor", "warmup_factor"]


def cosine_factor(progress: float, final_factor: float = 0.0) -> float:
    """Half a cosine from 1 at ``progress`` 0 down to ``final_factor`` at ``progress`` 1 (and after)."""
    progress = min(max(progress, 0.0), 1.0)
    return final_factor + (1 - final_factor) * (1 + math.cos(math.pi * progress)) / 2


def one_cycle_factor(progress: float, peak: float = 0.3, start_factor: float = 0.04,
                     final_factor: float = 0.0) -> float:
    """A linear rise from ``start_factor`` to 1 at ``progress`` = ``peak``, then half a cosine down to
    ``final_factor`` at ``progress`` 1 (Smith's one-cycle policy)."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < peak:
        return start_factor + (1 - start_factor) * progress / peak
    return cosine_factor((progress - peak) / (1 - peak), final_factor) if peak < 1 else 1.0


def warmup_factor(epochs_done: float, warmup_epochs: float) -> float:
    """A linear rise to 1 over ``warmup_epochs``: ``min(1, epochs_done / warmup_epochs)``; 1 when ``warmup_epochs``
    is 0.

    ``epochs_done`` counts the batch being trained: the first of ``N`` batches of epoch 0 is ``1 / N``, so the
    factor is above 0 from the first step and reaches 1 at the last batch of the warm-up.
    """
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, max(epochs_done, 0.0) / warmup_epochs)


class RunLengthSchedule(LambdaLR):
    """A ``LambdaLR`` of :meth:`factor` at ``step / length``; the length is set by the module (or :meth:`set_length`).

    Args:
        optimizer: the optimizer whose learning rates are scaled.
        last_epoch: as for every torch scheduler (``-1``: a new schedule).

    Raises:
        RuntimeError: at a ``step()`` past the first before :meth:`set_length` was called.
    """

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1) -> None:
        self.length: int | None = None
        super().__init__(optimizer, self._factor_at, last_epoch)

    def factor(self, progress: float) -> float:
        """The factor on the learning rate at ``progress`` in [0, 1] through training."""
        raise NotImplementedError

    def set_length(self, length: int) -> None:
        """Make the schedule end after ``length`` calls of ``step()`` (optimizer steps, or epochs).

        Raises:
            ValueError: if ``length`` is not an integer >= 1.
        """
        self.length = checks.check_int("length", length, 1)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base_lr * self._factor_at(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _factor_at(self, step: int) -> float:
        if self.length is None:
            if step > 0:
                raise RuntimeError(f"{type(self).__name__} has no length: give it to AdversarialSelectionModule as "
                                   f"`lr_scheduler`, or call set_length(steps) before stepping it")
            return self.factor(0.0)
        return self.factor(step / self.length)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position; the length stays this run's, so a resumed run may be longer or shorter."""
        length = self.length
        super().load_state_dict(state_dict)
        if length is not None:
            self.set_length(length)


class Cosine(RunLengthSchedule):
    """Cosine decay of the learning rate over the whole run, down to ``final_factor`` times the optimizer's.

    Args:
        optimizer: the optimizer (given by the module; not written in a config).
        final_factor: the factor at the end of training, in [0, 1].
        last_epoch: as for every torch scheduler.

    Raises:
        ValueError: for ``final_factor`` outside [0, 1].
    """

    def __init__(self, optimizer: Optimizer, final_factor: float = 0.0, last_epoch: int = -1) -> None:
        self.final_factor = _unit("final_factor", final_factor)
        super().__init__(optimizer, last_epoch)

    def factor(self, progress: float) -> float:
        return cosine_factor(progress, self.final_factor)


class OneCycle(RunLengthSchedule):
    """One cycle over the whole run: from ``start_factor`` up to the optimizer's learning rate at ``peak`` of
    the run, then cosine down to ``final_factor``.

    Args:
        optimizer: the optimizer (given by the module; not written in a config).
        peak: where the learning rate peaks, a fraction of the run in [0, 1).
        start_factor: the factor at the start, in [0, 1].
        final_factor: the factor at the end of training, in [0, 1].
        last_epoch: as for every torch scheduler.

    Raises:
        ValueError: for a fraction outside its range.
    """

    def __init__(self, optimizer: Optimizer, peak: float = 0.3, start_factor: float = 0.04, final_factor: float = 0.0,
                 last_epoch: int = -1) -> None:
        self.peak = _unit("peak", peak)
        if self.peak == 1:
            raise ValueError(f"`peak` must be below 1 (a fraction of the run), got {peak}")
        self.start_factor = _unit("start_factor", start_factor)
        self.final_factor = _unit("final_factor", final_factor)
        super().__init__(optimizer, last_epoch)

    def factor(self, progress: float) -> float:
        return one_cycle_factor(progress, self.peak, self.start_factor, self.final_factor)


def _unit(name: str, value: Any) -> float:
    value = checks.check_number(name, value, 0.0)
    if value > 1:
        raise ValueError(f"`{name}` must be in [0, 1], got {value}")
    return value
