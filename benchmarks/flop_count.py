"""A callback that counts the FLOPs of training: exact on the first steps of each epoch, scaled to the epoch.

A training step's FLOPs depend on the shapes only (batch size, ``p_up``, ``attack_frac``, PGD steps), which
are fixed within an epoch (``AdaptivePUp`` changes ``p_up`` between epochs), so the mean of the first
``steps_per_epoch`` counted steps times the epoch's batch count is the epoch's FLOPs; a last, smaller batch is
counted as a full one (a bound, off by less than one step per epoch). Counting every step would slow training
by the counter's dispatch overhead for no change in the total.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch.utils.flop_counter import FlopCounterMode


class CountFlops(Callback):
    """FLOPs of the training steps (scoring, attack, forward and backward), per epoch and in total."""

    def __init__(self, steps_per_epoch: int = 2, skip: int = 0) -> None:
        """``skip``: batches left uncounted at the start of each epoch (the module's first step of a fit also
        checks the model's output shape with a one-row forward, which is not a step's recurring work)."""
        self.steps_per_epoch = steps_per_epoch
        self.skip = skip
        self.per_epoch: list[int] = []
        self._counted: list[int] = []
        self._mode: FlopCounterMode | None = None

    @property
    def total_flops(self) -> int:
        return sum(self.per_epoch)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._counted = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx >= self.skip and len(self._counted) < self.steps_per_epoch:
            self._mode = FlopCounterMode(display=False)
            self._mode.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._counted.append(self._mode.get_total_flops())
            self._mode = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._counted:
            mean = sum(self._counted) / len(self._counted)
            self.per_epoch.append(round(mean * trainer.num_training_batches))
