"""Write what ``predict`` returns to files a user can read: a CSV of classes and a tensor file of logits."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_advsel.checks import check_path

CSV_COLUMNS = ("index", "label", "pred", "pred_adv")  # those present, in this order


class PredictionWriter(BasePredictionWriter):
    """Writes the rows that :meth:`~lightning_advsel.AdversarialSelectionModule.predict_step` returns.

    Two files, one row per input, in the order of the prediction loader:

    * ``predictions.csv``: ``index`` (the row's position in the loader's data set), ``label`` (when the batches
      carry labels), ``pred`` (the predicted class) and ``pred_adv`` (the class under ``predict_attack``, when set).
    * ``predictions.pt``: the same columns as tensors plus ``logits`` and ``logits_adv`` ``(N, num_classes)``;
      ``torch.load(path, weights_only=True)`` reads it.

    ``lightning-advsel predict`` adds this callback unless a config gives its own prediction writer. Under DDP each
    rank writes its own rows (``predictions.rank<r>.csv``, ``.pt``); their ``index`` column joins them (the
    distributed sampler repeats a few rows so that ranks hold equal counts).

    Args:
        output_dir: folder of the files; ``None`` (default): the trainer's ``log_dir``, the run's folder
            (``lightning_logs/<run name>/version_<n>`` for the CLI), or ``default_root_dir`` without a logger.

    Raises:
        ValueError: for an ``output_dir`` that is not a path.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = check_path("output_dir", output_dir, "a folder path", optional=True)
        self.paths: list[Path] = []  # the files written by the last `predict`
        self._rows: list[dict[str, Tensor]] = []

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows = []

    @override
    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        if not isinstance(prediction, dict) or "pred" not in prediction:
            raise ValueError(f"{type(self).__name__} writes the dict that AdversarialSelectionModule.predict_step "
                             f"returns, got {type(prediction).__name__}")
        rows = {key: value.detach().cpu() for key, value in prediction.items()}
        n = len(rows["pred"])
        start = sum(len(r["pred"]) for r in self._rows)
        indices = list(batch_indices) if batch_indices is not None and len(batch_indices) == n else None
        rows["index"] = torch.tensor(indices) if indices is not None else torch.arange(start, start + n)
        labels = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
        if isinstance(labels, Tensor) and labels.shape == (n,) and not labels.is_floating_point():
            rows["label"] = labels.detach().cpu()
        self._rows.append(rows)

    @override
    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._rows:
            return
        columns = {key: torch.cat([r[key] for r in self._rows]) for key in self._rows[0]}
        folder = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        stem = "predictions" if trainer.world_size == 1 else f"predictions.rank{trainer.global_rank}"
        torch.save(columns, folder / f"{stem}.pt")
        shown = [key for key in CSV_COLUMNS if key in columns]
        with open(folder / f"{stem}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(shown)
            writer.writerows(zip(*(columns[key].tolist() for key in shown), strict=True))
        self.paths = [folder / f"{stem}.csv", folder / f"{stem}.pt"]
        rank_zero_info(f"predictions of {len(columns['pred'])} rows written to {self.paths[0]} and "
                       f"{self.paths[1].name}")
        self._rows = []
