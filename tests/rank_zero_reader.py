"""A callback for the DDP tests: on global rank 0 only, it reads the trainer's metrics at every epoch and stage end,
as a user's rank-zero logging or alerting callback would (reading them computes, and so syncs, logged values)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class ReadMetricsOnRankZero(L.Callback):
    """Reads ``trainer.progress_bar_metrics`` and ``trainer.callback_metrics`` on rank 0 at every epoch and stage end,
    and, when ``path`` is given, writes the hooks it read in to ``path`` (rank 0) when the process ends a stage."""


    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.reads: list[str] = []

    def _read(self, trainer: L.Trainer, hook: str) -> None:
        if not trainer.is_global_zero:
            return
        values = {**trainer.progress_bar_metrics, **trainer.callback_metrics}
        self.reads.append(f"{hook}:{len(values)}")
        if self.path is not None:
            Path(self.path).write_text(json.dumps(self.reads))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read(trainer, "on_train_epoch_end")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read(trainer, "on_validation_epoch_end")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read(trainer, "on_validation_end")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read(trainer, "on_test_epoch_end")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read(trainer, "on_test_end")
