"""Selection make-up (DS paper, Fig. 7): how many clean and adversarial rows the selection backpropagated."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torchmetrics import Metric
from typing_extensions import override

from lightning_advsel import distributed
from lightning_advsel.callbacks.history import EpochHistory
from lightning_advsel.step import check_selection_module


class SelectionCounts(Metric):
    """Counts of selected clean and adversarial rows, in total and per class, summed over DDP ranks.

    ``update(y, is_adv, selected)`` takes the pool labels ``(P,)``, the pool's adversarial flags ``(P,)`` and
    the indices of the selected rows ``(S,)`` (the fields of :class:`~lightning_advsel.SelectionRecord`).
    ``compute()`` returns a dict of the synced counts: ``n_clean``, ``n_adv`` (scalars), ``class_clean`` and
    ``class_adv`` (shape ``(num_classes,)``).
    """

    full_state_update = False

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.add_state("n_clean", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("n_adv", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("class_clean", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("class_adv", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, y: Tensor, is_adv: Tensor, selected: Tensor) -> None:
        adv = is_adv[selected].bool()
        labels = y[selected].long()
        n_adv = adv.sum()
        self.n_adv += n_adv
        self.n_clean += adv.numel() - n_adv
        # Per class by comparison with every class, not a boolean mask or bincount: on a GPU both read the device
        # to size their output, which would stall every training step.
        in_class = labels[:, None] == torch.arange(self.num_classes, device=labels.device)
        self.class_adv += (in_class & adv[:, None]).sum(0)
        self.class_clean += (in_class & ~adv[:, None]).sum(0)

    def compute(self) -> dict[str, Tensor]:
        return {"n_clean": self.n_clean, "n_adv": self.n_adv, "class_clean": self.class_clean,
                "class_adv": self.class_adv}


class SelectionMakeup(EpochHistory, Callback):
    """Logs, per training epoch, the clean / adversarial make-up of the backpropagated rows.

    Reads ``pl_module.last_selection`` after every training batch. At the end of the epoch it logs (counts
    summed over DDP ranks, so every rank logs the same values):

    * ``selection/n_clean``, ``selection/n_adv``: selected clean and adversarial rows in the epoch;
    * (their shares of all selected rows are the module's ``train/selected_adv_frac``, logged without this
      callback too);
    * ``selection/class_{c}/adv_frac``: the adversarial share of the selected rows of class ``c`` (classes
      with no selected row in the epoch are not logged).

    ``history`` keeps one dict per epoch for :class:`~lightning_advsel.callbacks.PaperFigures`; it is part of
    the checkpoint state.
    """

    def __init__(self, per_class: bool = True) -> None:
        self.per_class = per_class
        self.counts: SelectionCounts | None = None
        self.history: list[dict[str, Any]] = []

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_selection_module(pl_module, type(self).__name__)
        if self.counts is None:
            self.counts = SelectionCounts(int(pl_module.num_classes))

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.counts.to(pl_module.device)
        self.counts.reset()

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        record = pl_module.last_selection
        if record is not None:
            self.counts.update(record.y, record.is_adv, record.selected)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        distributed.settle_logged_values(trainer)  # a rank-zero reader may have synced them on rank 0 alone
        counts = {k: v.cpu() for k, v in self.counts.compute().items()}
        n_clean, n_adv = int(counts["n_clean"]), int(counts["n_adv"])
        # The adversarial share itself is the module's `train/selected_adv_frac`: logged once, from one source.
        values = {"selection/n_clean": float(n_clean), "selection/n_adv": float(n_adv)}
        if self.per_class:
            class_total = counts["class_clean"] + counts["class_adv"]
            for c in range(self.counts.num_classes):
                if class_total[c] > 0:
                    values[f"selection/class_{c}/adv_frac"] = float(counts["class_adv"][c] / class_total[c])
        distributed.log_rank_wide(pl_module, values)
        self.record(trainer.current_epoch, {"n_clean": n_clean, "n_adv": n_adv,
                                            "class_clean": counts["class_clean"].tolist(),
                                            "class_adv": counts["class_adv"].tolist()})
