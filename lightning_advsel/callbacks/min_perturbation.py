"""Minimum perturbation (DS paper, Fig. 8): the smallest radius at which PGD changes each prediction, and
whether the data-selection rule would pick such minimally perturbed examples of a training batch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_advsel import distributed, selection
from lightning_advsel.attacks import ATTACK_LOSSES, MODES, NORMS, AttackConfig, AttackLoss, Mode, Norm, model_mode
from lightning_advsel.batch import unpack
from lightning_advsel.callbacks.history import EpochHistory
from lightning_advsel.checks import check_choice, check_fraction, check_int, check_linf_eps, check_number
from lightning_advsel.step import check_selection_module


def _read_batch(pl_module: L.LightningModule, batch: Any) -> tuple[Tensor, Tensor]:
    """A batch's inputs (in pixels) and labels by the module's own rule; plain :func:`unpack` for a user's module
    without ``read_batch``."""
    read = getattr(pl_module, "read_batch", None)
    x, y, _ = read(batch) if read is not None else unpack(batch)
    return x, y


def _pixel_model(pl_module: L.LightningModule) -> nn.Module:
    """The classifier on pixels: the module's ``pixel_model`` when it has one, else its ``model``."""
    return getattr(pl_module, "pixel_model", pl_module.model)


def _validation_loader(trainer: L.Trainer) -> DataLoader | None:
    """The (first) validation loader: the one the trainer loaded, else the data module's ``val_dataloader()``."""
    loaders = trainer.val_dataloaders
    if loaders is None and trainer.datamodule is not None and is_overridden("val_dataloader", trainer.datamodule):
        loaders = trainer.datamodule.val_dataloader()
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    return loaders


def minimum_eps(model: nn.Module, x: Tensor, y: Tensor, radii: Tensor, *, norm: Norm = "linf", steps: int = 5,
                step_factor: float = 2.5, mode: Mode = "eval", loss: AttackLoss = "ce") -> tuple[Tensor, Tensor]:
    """Per sample, the smallest radius of ``radii`` at which PGD makes the model misclassify it.

    At each radius ``r`` (ascending) PGD (``steps`` steps of size ``step_factor * r / steps``, no random start,
    so the result is a function of the weights alone) attacks the samples not misclassified yet. A sample the
    model misclassifies clean has radius 0; one that survives every radius has ``inf``. Resolution: the
    answer ``r_i`` means "not flipped at ``r_{i-1}``, flipped at ``r_i``" (as far as PGD finds).

    Args:
        model: classifier on inputs in [0, 1].
        x: inputs in [0, 1], shape ``(N, C, H, W)``.
        y: labels, shape ``(N,)``.
        radii: ascending radii in pixel units, shape ``(R,)``.
        norm: ``"linf"`` or ``"l2"``.
        steps: PGD steps per radius.
        step_factor: total travel of PGD in units of the radius.
        mode: model mode of the clean pass and the attack (see :func:`~lightning_advsel.attacks.model_mode`).
        loss: what PGD maximises: ``"ce"``, the cross-entropy, or ``"margin"``, the largest wrong logit minus the
            true one (:func:`~lightning_advsel.attacks.margin_loss`). On a model with near-uniform outputs the
            cross-entropy's gradient is a poor guide to the nearest wrong class, and the radii it finds are
            larger than the weights deserve; the margin finds smaller ones at the same cost.

    Returns:
        ``(min_eps, x_min)``: shape ``(N,)`` radii (0, a radius of ``radii``, or ``inf``) and, shape of ``x``,
        the adversarial example found at that radius (the clean input for radius 0 and for ``inf``).
    """
    check_choice("loss", loss, ATTACK_LOSSES)
    with torch.no_grad(), model_mode(model, mode):
        wrong = model(x).argmax(1) != y
    min_eps = torch.full((x.shape[0],), math.inf, device=x.device)
    min_eps[wrong] = 0.0
    x_min = x.detach().clone()
    for r in radii.tolist():
        todo = torch.isinf(min_eps).nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        attack = AttackConfig(eps=r, alpha=step_factor * r / steps, steps=steps, norm=norm, random_start=False,
                              mode=mode, loss=loss)
        x_adv = attack(model, x[todo], y[todo])
        with torch.no_grad(), model_mode(model, mode):
            flipped = model(x_adv).argmax(1) != y[todo]
        min_eps[todo[flipped]] = r
        x_min[todo[flipped]] = x_adv[flipped]
    return min_eps, x_min


@dataclass
class MinimumAdversarialPool:
    """The DS pool of a batch's clean rows and their minimum adversarial examples, and what DS selects from it.

    Attributes:
        min_eps: per batch row, shape ``(N,)``, the radius found by :func:`minimum_eps` (0, a grid radius or inf).
        rows: the ``n`` batch rows in the pool (flipped at a positive radius), ascending, shape ``(n,)``.
        loss: per-sample cross-entropy of the pool, shape ``(2n,)``: the clean rows ``rows``, then their
            minimum adversarial examples in the same order.
        selected: pool indices of the top ``fraction_count(2n, p_up)`` losses, ascending.
    """

    min_eps: Tensor
    rows: Tensor
    loss: Tensor
    selected: Tensor

    @property
    def n_selected_min_adv(self) -> int:
        """How many selected rows are minimum adversarial examples (pool indices ``n`` and above)."""
        return int((self.selected >= self.rows.numel()).sum())


def minimum_adversarial_pool(model: nn.Module, x: Tensor, y: Tensor, radii: Tensor, p_up: float, *,
                             norm: Norm = "linf", steps: int = 5, step_factor: float = 2.5, mode: Mode = "eval",
                             scoring_mode: Mode = "train", loss: AttackLoss = "ce") -> MinimumAdversarialPool:
    """Would the data-selection rule select the minimally perturbed examples of a clean batch (DS paper, Fig. 8)?

    :func:`minimum_eps` finds each row's minimum-radius adversarial example on the grid ``radii``. The rows
    flipped at a positive radius and their minimum adversarial examples form the pool, scored as DS scores its
    pool (per-sample cross-entropy against the true label, one no-grad forward pass in ``scoring_mode``); the
    top ``fraction_count(2n, p_up)`` losses are selected (ties broken as the DS rule breaks them).

    Two kinds of rows have no minimum adversarial example and are left out, clean row included, so that the
    pool stays pairs of a clean row and its adversarial example, half and half as DS's own pool:

    * rows misclassified clean (radius 0): their "minimum adversarial example" is the clean row itself, and a
      pool holding the same input twice would have a tie that only the order of the rows decides;
    * rows no grid radius flips (``inf``): the example at the largest radius is still classified correctly,
      so it is not an adversarial example at all.

    ``min_eps`` tells how many rows each case takes.

    Args:
        model: classifier on inputs in [0, 1].
        x: clean inputs in [0, 1], shape ``(N, C, H, W)``.
        y: labels, shape ``(N,)``.
        radii: ascending radii in pixel units, shape ``(R,)``.
        p_up: the fraction DS selects, in (0, 1].
        norm: ``"linf"`` or ``"l2"``.
        steps: PGD steps per radius.
        step_factor: PGD travel in units of the radius.
        mode: model mode of the search (see :func:`~lightning_advsel.attacks.model_mode`). An example flipped
            in this mode may be classified correctly in a different ``scoring_mode``.
        scoring_mode: model mode of the scoring pass, as the module's ``scoring_mode``.
        loss: what the search's PGD maximises (see :func:`minimum_eps`). The pool is scored by the cross-entropy
            whatever this is, as DS scores its pool.

    Returns:
        The pool, its losses and the selected pool indices; empty tensors when no row is in the pool.

    Raises:
        ValueError: for ``p_up`` outside (0, 1], an unknown ``scoring_mode`` or ``loss``.
    """
    check_fraction("p_up", p_up)
    check_choice("scoring_mode", scoring_mode, MODES)
    min_eps, x_min = minimum_eps(model, x, y, radii, norm=norm, steps=steps, step_factor=step_factor, mode=mode,
                                 loss=loss)
    rows = ((min_eps > 0) & torch.isfinite(min_eps)).nonzero().squeeze(1)
    if rows.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=x.device)
        return MinimumAdversarialPool(min_eps, empty, torch.zeros(0, device=x.device), empty)
    with torch.no_grad(), model_mode(model, scoring_mode):
        loss = selection.per_sample_loss(model(torch.cat([x[rows], x_min[rows]])), y[rows].repeat(2))
    selected = selection.top_k(loss, selection.fraction_count(loss.numel(), p_up))
    return MinimumAdversarialPool(min_eps, rows, loss, selected)


class MinimumPerturbation(EpochHistory, Callback):
    """Every ``every_n_epochs`` training epochs (and after the last), the minimum-perturbation distribution.

    The probe is the first ``probe_size`` samples of the validation data set (of the first validation loader, read
    by the loader's ``collate_fn`` and the module's batch rule), fixed for the whole run. For each
    probe sample :func:`minimum_eps` finds the smallest radius of the grid ``max_eps * i / num_eps``,
    ``i = 1..num_eps``, at which PGD-``steps`` makes the model misclassify it (0 if it is misclassified
    clean). Under DDP the probe is split across ranks (rank ``r`` takes samples ``r, r + W, ...``) and the
    per-sample radii are gathered, so the logged distribution equals a single-process run on the same probe.

    Logged (same value on every rank): ``minperturb/mean`` and ``minperturb/median`` of the radii with
    unflipped samples counted as ``max_eps`` (a lower bound), ``minperturb/unflipped_frac`` (no flip up to
    ``max_eps``), ``minperturb/robust_frac_at_train_eps`` (not flipped at any grid radius up to the module's
    training eps; exact when the training eps lies on the grid, as it does with the default ``max_eps``),
    the Fig. 8 statistics of a training batch (below), and the TensorBoard histogram ``minperturb/eps`` of
    the radii.

    Fig. 8 asks whether DS would select the minimally perturbed examples of training samples. On each rank the
    clean rows of the epoch's last training batch (the first ``max_train_rows`` of them) go through
    :func:`minimum_adversarial_pool` on the same radius grid: the rows flipped at a positive radius and their
    minimum adversarial examples form a DS pool, scored by per-sample cross-entropy in one no-grad forward pass
    in the module's ``scoring_mode``, and its top ``fraction_count(pool size, p_up)`` are selected, with the
    module's current ``p_up``. Counts are summed over ranks (each rank uses its own batch):

    * ``minperturb/selected_min_adv_frac``: share of the selected rows that are minimum adversarial examples
      (half the pool is, so a random selection scores 0.5); not logged when no row of any rank is in a pool;
    * ``minperturb/train_misclassified_frac``: share of the searched rows misclassified clean (radius 0);
    * ``minperturb/train_unflipped_frac``: share of the searched rows no radius up to ``max_eps`` flips.

    The last two kinds of rows are left out of the pool, clean row included (see
    :func:`minimum_adversarial_pool` for why).

    Cost: at most ``(probe_size + max_train_rows) * num_eps * (steps + 1)`` forward passes and
    ``(probe_size + max_train_rows) * num_eps * steps`` backward passes per measurement (samples already
    flipped are not attacked again), the probe split over ranks and the training rows per rank; printed when
    training starts.

    Args:
        probe_size: validation samples probed.
        every_n_epochs: measure after every this many training epochs (and after the last one).
        max_eps: largest radius, pixel units; ``None``: twice the module's ``train_attack.eps``.
        num_eps: grid radii; resolution ``max_eps / num_eps``.
        norm: ``"linf"`` or ``"l2"``; ``None``: the norm of the module's ``train_attack``.
        steps: PGD steps per radius.
        step_factor: PGD travel in units of the radius (step size ``step_factor * r / steps``).
        mode: model mode during the search.
        max_train_rows: training rows searched per rank for the Fig. 8 statistics (the first ones of the
            epoch's last batch); ``None``: the whole batch.
        loss: what the search's PGD maximises, ``"ce"`` or ``"margin"`` (see :func:`minimum_eps`); ``None``: the
            loss of the module's ``train_attack``, so that the radii are measured with the attack the model is
            trained against.

    Raises:
        ValueError: for a non-positive ``probe_size``, ``every_n_epochs``, ``num_eps``, ``steps``,
            ``max_train_rows``, ``max_eps`` or ``step_factor``, an unknown ``norm``, ``mode`` or ``loss``; at fit start,
            no ``max_eps`` with a zero training eps; when training starts (before the first batch), a
            ``probe_size`` larger than the validation set or no validation data.
    """

    def __init__(self, probe_size: int = 64, every_n_epochs: int = 1, max_eps: float | None = None,
                 num_eps: int = 12, norm: Norm | None = None, steps: int = 5, step_factor: float = 2.5,
                 mode: Mode = "eval", max_train_rows: int | None = None, loss: AttackLoss | None = None) -> None:
        for name, value in (("probe_size", probe_size), ("every_n_epochs", every_n_epochs), ("num_eps", num_eps),
                            ("steps", steps)):
            check_int(name, value, 1)
        if max_eps is not None:
            check_number("max_eps", max_eps, 0, strict=True)
        check_number("step_factor", step_factor, 0, strict=True)
        check_int("max_train_rows", max_train_rows, 1, optional=True)
        check_choice("norm", norm, (*NORMS, None))
        check_choice("mode", mode, MODES)
        check_choice("loss", loss, (*ATTACK_LOSSES, None))
        self.probe_size = probe_size
        self.every_n_epochs = every_n_epochs
        self.max_eps = max_eps
        self.num_eps = num_eps
        self.norm = norm
        self.steps = steps
        self.step_factor = float(step_factor)
        self.mode = mode
        self.max_train_rows = max_train_rows
        self.loss = loss
        self.history: list[dict[str, Any]] = []
        self._probe: tuple[Tensor, Tensor] | None = None
        self._last_batch: tuple[Tensor, Tensor] | None = None

    @property
    def radii(self) -> Tensor:
        return torch.arange(1, self.num_eps + 1, dtype=torch.float64) * (self.max_eps / self.num_eps)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_selection_module(pl_module, type(self).__name__)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        attack = pl_module.settings.train_attack
        if self.max_eps is None:
            if not attack.enabled:
                raise ValueError("MinimumPerturbation: set `max_eps`; the module's training eps is 0")
            self.max_eps = 2 * attack.eps
        self.norm = self.norm or attack.norm
        self.loss = self.loss or attack.loss
        check_linf_eps("max_eps", self.max_eps, self.norm)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning has loaded the validation loaders by now when the first epoch validates (or the sanity check
        # ran); otherwise the data module's `val_dataloader()` is asked.
        loader = _validation_loader(trainer)
        if loader is None:
            raise ValueError(
                "MinimumPerturbation needs validation data when training starts: pass a datamodule with "
                "val_dataloader(), or val_dataloaders to `fit` with a first epoch that validates (or a sanity check)"
            )
        size = len(loader.dataset)
        if self.probe_size > size:
            raise ValueError(f"`probe_size`={self.probe_size} is larger than the validation set ({size} samples); "
                             f"lower `probe_size` to at most {size}")
        # Straight from the data set: the probe is the same whatever sampler the validation loader has.
        rank, world = trainer.global_rank, trainer.world_size
        probe = loader.collate_fn([loader.dataset[i] for i in range(rank, self.probe_size, world)])
        x, y = _read_batch(pl_module, move_data_to_device(probe, pl_module.device))
        self._probe = (x, y)
        # Printed here rather than at fit start: the training loader, whose batch size sets the cost of the
        # training-batch search, is loaded by now.
        batch_size = getattr(trainer.train_dataloader, "batch_size", None)
        rows = self.max_train_rows if batch_size is None else min(batch_size, self.max_train_rows or batch_size)
        per_row = self.num_eps * self.steps
        rank_zero_info(
            f"MinimumPerturbation: probe {self.probe_size} validation samples, {self.num_eps} radii up to "
            f"{self.max_eps:g} ({self.norm}, resolution {self.max_eps / self.num_eps:g}), PGD-{self.steps} "
            f"({self.loss}) per radius: at most {self.probe_size * per_row} sample gradient steps every "
            f"{self.every_n_epochs} epoch(s), split over {trainer.world_size} rank(s); plus, on each rank, "
            + (f"{rows} rows of the epoch's last training batch: at most {rows * per_row} more" if rows else
               f"every row of the epoch's last training batch: at most {per_row} more per row")
        )

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        x, y = _read_batch(pl_module, batch)
        self._last_batch = (x[: self.max_train_rows].detach(), y[: self.max_train_rows].detach())

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and 0 < trainer.max_epochs <= epoch + 1  # -1: no last epoch
        if (epoch + 1) % self.every_n_epochs and not last:
            return
        distributed.settle_logged_values(trainer)  # before this hook's gather and sum over ranks
        model = _pixel_model(pl_module)
        x, y = self._probe
        local, _ = minimum_eps(model, x, y, self.radii.to(x.device), norm=self.norm, steps=self.steps,
                               step_factor=self.step_factor, mode=self.mode, loss=self.loss)
        eps = self._gather(trainer, pl_module, local)
        censored = eps.clamp(max=self.max_eps)
        train_eps = float(pl_module.settings.train_attack.eps)
        values = {
            "minperturb/mean": float(censored.mean()),
            "minperturb/median": float(censored.quantile(0.5)),
            "minperturb/unflipped_frac": float(torch.isinf(eps).float().mean()),
            "minperturb/robust_frac_at_train_eps": float((eps > train_eps * (1 + 1e-6)).float().mean()),
        }
        counts = self._train_batch_counts(trainer, pl_module)
        if counts["train_rows"]:
            values["minperturb/train_misclassified_frac"] = counts["train_misclassified"] / counts["train_rows"]
            values["minperturb/train_unflipped_frac"] = counts["train_unflipped"] / counts["train_rows"]
        if counts["selected"]:
            values["minperturb/selected_min_adv_frac"] = counts["selected_min_adv"] / counts["selected"]
        distributed.log_rank_wide(pl_module, values)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_histogram("minperturb/eps", censored.cpu(), trainer.global_step)
        self.record(epoch, {"max_eps": self.max_eps, "num_eps": self.num_eps, "loss": self.loss,
                            "eps": censored.cpu().tolist(),
                            **values, **counts})

    def _train_batch_counts(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int]:
        """The Fig. 8 counts of this rank's last training batch, summed over ranks (a collective: every rank)."""
        keys = ("train_rows", "train_misclassified", "train_unflipped", "pool_size", "selected", "selected_min_adv")
        local = torch.zeros(len(keys), dtype=torch.float64, device=pl_module.device)
        if self._last_batch is not None:
            x, y = self._last_batch
            pool = minimum_adversarial_pool(_pixel_model(pl_module), x, y, self.radii.to(x.device), pl_module.p_up,
                                            norm=self.norm, steps=self.steps, step_factor=self.step_factor,
                                            mode=self.mode, scoring_mode=pl_module.settings.scoring_mode,
                                            loss=self.loss)
            local = torch.tensor([y.numel(), int((pool.min_eps == 0).sum()), int(torch.isinf(pool.min_eps).sum()),
                                  pool.loss.numel(), pool.selected.numel(), pool.n_selected_min_adv],
                                 dtype=torch.float64, device=pl_module.device)
        total = trainer.strategy.reduce(local, reduce_op="sum")
        return {key: int(v) for key, v in zip(keys, total.tolist(), strict=True)}

    def _gather(self, trainer: L.Trainer, pl_module: L.LightningModule, local: Tensor) -> Tensor:
        """All ranks' radii in probe order; shards differ in length by at most one, so pad with NaN."""
        world = trainer.world_size
        if world == 1:
            return local.double()
        width = math.ceil(self.probe_size / world)
        padded = torch.full((width,), math.nan, dtype=torch.float64, device=local.device)
        padded[: local.numel()] = local
        gathered = pl_module.all_gather(padded)  # (world, width)
        eps = torch.empty(self.probe_size, dtype=torch.float64, device=local.device)
        for r in range(world):
            shard = gathered[r][: len(range(r, self.probe_size, world))]
            eps[r::world] = shard
        return eps
