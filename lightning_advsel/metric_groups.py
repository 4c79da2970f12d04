"""The module's metrics in groups, one keyed collection for every stage and loader.

:class:`MetricGroups` holds a :class:`TrainMetrics` under ``"train_0"`` and an :class:`EvalMetrics` per validation
or test loader (``"val_0"``, ``"val_1"``, ``"test_0"``, ...), made when first met, so no loader's rows reach another's
numbers and each is synced over DDP ranks on its own. A group updates its metrics from what a step produced, logs
them through the module's ``log`` under the slash-named keys (``train/acc``, ``val/acc_robust``), and the training
group gives and takes the states a checkpoint keeps.

No training metric makes the host wait for the device (see :mod:`lightning_advsel.metrics`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_advsel import selection
from lightning_advsel.metrics import SyncFreeMean
from lightning_advsel.step import StepResult

Log = Callable[..., Any]  # a LightningModule's ``log``


def scalar(value: float, device: torch.device) -> Tensor:
    """A number to log every step, made on ``device`` by a kernel: ``log`` turns a Python number into a tensor by
    a copy from the host, which on a GPU waits for all the work queued before it."""
    return torch.full((), float(value), device=device)


def accuracy(num_classes: int) -> MulticlassAccuracy:
    return MulticlassAccuracy(num_classes, average="micro")


class TrainMetrics(nn.Module):
    """The training step's epoch values: loss, accuracies, the make-up of the selection, the pre-attack scores.

    Args:
        num_classes: classes of the task.
        attribute: this group's attribute path in the LightningModule, which Lightning needs to find a metric.
    """

    # The epoch accumulators of the selection statistics that a checkpoint keeps (as ``train_<name>``), so that
    # a run resumed mid-epoch logs the same epoch values; the loss and the score means start the epoch anew.
    RESUMED = ("acc", "acc_selected", "adv_frac", "clean_frac", "attacked_frac")

    def __init__(self, num_classes: int, attribute: str) -> None:
        super().__init__()
        self.attribute = attribute
        # The mean loss over the selected rows: its epoch value is the mean over ranks (synced once, at the
        # epoch's end) while its step value stays this rank's (no per-step collective).
        self.loss = SyncFreeMean()
        self.acc = accuracy(num_classes)
        self.acc_selected = accuracy(num_classes)
        self.adv_frac = SyncFreeMean()
        self.clean_frac = SyncFreeMean()
        self.attacked_frac = SyncFreeMean()
        self.attack_score_selected = SyncFreeMean()
        self.attack_score_unselected = SyncFreeMean()

    def log_step(self, out: StepResult, log: Log, p_up: Tensor) -> None:
        """Count one training step in the epoch's metrics and log them; ``p_up`` is the step's, on the device.

        Every rank logs the same keys every step: the epoch-end sync of a metric is a collective.
        """
        r = out.record
        selected, y = r.selected, r.y[r.selected]
        # The scaled global loss is not a mean: show this rank's mean cross-entropy instead.
        global_loss = r.logits is not None and out.k_global is not None
        shown = F.cross_entropy(r.logits, y) if global_loss else out.loss.detach()
        # Accuracy over the pool: from the scoring pass when there was one; otherwise the trained rows are the
        # whole pool or a uniform sample of it. update, not forward: only epoch values are logged.
        if out.pool_logits is not None:
            self.acc.update(out.pool_logits, r.y)
        elif selected.numel():
            self.acc.update(r.logits, y)
        s = selected.numel()
        if s:
            self.acc_selected.update(r.logits, y)
            self.adv_frac.update(r.is_adv[selected].float())
            self.clean_frac.update((~r.is_adv[selected]).float())
        n = r.batch_size
        self.attacked_frac.update(r.y.new_full((), r.attacked.numel() / n, dtype=torch.float), weight=n)
        if s:
            self.loss(shown, weight=s)  # the step's value, and its share of the epoch's weighted mean
        else:  # no row selected on this rank (global scope): nothing to average; the step shows the last value
            self.loss.update(shown, weight=0)
        self._log(log, "train/loss", "loss", on_step=True, prog_bar=True)
        # The same on every rank: the epoch-end sync (one all-reduce per epoch) only keeps DDP's logging uniform.
        log("train/p_up", p_up, on_step=False, on_epoch=True, batch_size=s, sync_dist=True)
        self._log(log, "train/acc", "acc", prog_bar=True)
        for key, name in (("train/acc_selected", "acc_selected"), ("train/selected_adv_frac", "adv_frac"),
                          ("train/selected_clean_frac", "clean_frac"), ("train/attacked_frac", "attacked_frac")):
            self._log(log, key, name)
        if r.attack_scores is not None:
            self._log_attack_scores(log, r.attack_scores, r.attacked)

    def _log_attack_scores(self, log: Log, scores: Tensor, attacked: Tensor) -> None:
        """Epoch means of the pre-attack score (margin, cosine, ...) over the attacked and the other rows."""
        self.attack_score_selected.update(scores[attacked])
        self._log(log, "train/attack_score_selected", "attack_score_selected")
        others = scores.numel() - attacked.numel()  # attacked holds distinct rows
        if others:  # attack_frac = 1 leaves no unattacked rows
            # The other rows' indices without a boolean mask, which would make the host wait for the device.
            rest = torch.ones_like(scores, dtype=torch.uint8).index_fill_(0, attacked, 0)
            self.attack_score_unselected.update(scores[selection.mask_indices(rest, others)])
            self._log(log, "train/attack_score_unselected", "attack_score_unselected")

    def _log(self, log: Log, key: str, name: str, on_step: bool = False, prog_bar: bool = False) -> None:
        """Log the epoch value of metric ``name`` under ``key`` (and its step value with ``on_step``)."""
        log(key, getattr(self, name), on_step=on_step, on_epoch=True, prog_bar=prog_bar,
            metric_attribute=f"{self.attribute}.{name}")

    def state(self) -> dict[str, dict[str, Tensor]]:
        """The states of the :data:`RESUMED` metrics, on the CPU, keyed ``train_<name>``."""
        return {f"train_{name}": {key: value.detach().cpu().clone()
                                  for key, value in getattr(self, name).metric_state.items()
                                  if isinstance(value, Tensor)}
                for name in self.RESUMED}

    def load_state(self, states: dict[str, dict[str, Tensor]]) -> None:
        """Continue from :meth:`state`'s values; a name or a set of states this group does not have is skipped."""
        for key, metric_states in states.items():
            metric = getattr(self, key.removeprefix("train_"), None) if key.startswith("train_") else None
            if not isinstance(metric, nn.Module) or set(metric_states) != set(metric.metric_state):
                continue
            # Every state of these metrics is a sum, so merging into reset states gives the saved values exactly.
            metric.reset()
            metric.merge_state({k: value.to(metric.device) for k, value in metric_states.items()})


class EvalMetrics(nn.Module):
    """One validation or test loader's clean accuracy, robust accuracy and clean loss.

    The clean loss is a metric for the same reason as the training loss: its epoch value is the mean over every
    rank's rows. A non-finite loss stays in the mean (a diverged model shows NaN, not a mean of its finite rows);
    it is fed one value per row because this NaN strategy ignores weights (torchmetrics 1.9).

    Args:
        num_classes: classes of the task.
        attribute: this group's attribute path in the LightningModule.
    """

    def __init__(self, num_classes: int, attribute: str) -> None:
        super().__init__()
        self.attribute = attribute
        self.acc_clean = accuracy(num_classes)
        self.acc_robust = accuracy(num_classes)
        self.loss_clean = MeanMetric(nan_strategy="disable")

    def log_clean(self, log: Log, stage: str, logits: Tensor, y: Tensor) -> None:
        """Count a batch's clean logits; log ``{stage}/loss_clean`` and ``{stage}/acc_clean``.

        With several loaders Lightning appends ``/dataloader_idx_{i}`` to each key (``add_dataloader_idx``).
        """
        self.loss_clean(F.cross_entropy(logits, y, reduction="none"))  # per row: the epoch's value is their mean
        self.acc_clean(logits, y)
        log(f"{stage}/loss_clean", self.loss_clean, metric_attribute=f"{self.attribute}.loss_clean")
        log(f"{stage}/acc_clean", self.acc_clean, prog_bar=True, metric_attribute=f"{self.attribute}.acc_clean")

    def log_robust(self, log: Log, stage: str, logits_adv: Tensor, y: Tensor) -> None:
        """Count a batch's logits under attack; log ``{stage}/acc_robust``."""
        self.acc_robust(logits_adv, y)
        log(f"{stage}/acc_robust", self.acc_robust, prog_bar=True, metric_attribute=f"{self.attribute}.acc_robust")


class MetricGroups(nn.ModuleDict):
    """Every metric group of a module, keyed ``"{stage}_{dataloader_idx}"``: ``"train_0"``, ``"val_0"``, ...

    Args:
        num_classes: classes of the task.
        attribute: the collection's attribute name in the LightningModule.
    """

    def __init__(self, num_classes: int, attribute: str) -> None:
        super().__init__({"train_0": TrainMetrics(num_classes, f"{attribute}.train_0")})
        self.num_classes = num_classes
        self.attribute = attribute

    @property
    def train_group(self) -> TrainMetrics:
        return self["train_0"]

    def eval_group(self, stage: str, dataloader_idx: int, device: torch.device) -> EvalMetrics:
        """The group of one ``stage`` loader, made on ``device`` when first met."""
        key = f"{stage}_{dataloader_idx}"
        if key not in self:
            self[key] = EvalMetrics(self.num_classes, f"{self.attribute}.{key}").to(device)
        return self[key]
