"""Minimum perturbation (DS paper, Fig. 8): the smallest radius at which PGD changes each probe prediction."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import default_collate
from typing_extensions import override

from lightning_advsel import selection
from lightning_advsel.attacks import MODES, NORMS, model_mode, pgd
from lightning_advsel.batch import unpack
from lightning_advsel.callbacks.history import EpochHistory


def minimum_eps(model: nn.Module, x: Tensor, y: Tensor, radii: Tensor, *, norm: str = "linf", steps: int = 5,
                step_factor: float = 2.5, mode: str = "eval") -> tuple[Tensor, Tensor]:
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

    Returns:
        ``(min_eps, x_min)``: shape ``(N,)`` radii (0, a radius of ``radii``, or ``inf``) and, shape of ``x``,
        the adversarial example found at that radius (the clean input for radius 0 and for ``inf``).
    """
    with torch.no_grad(), model_mode(model, mode):
        wrong = model(x).argmax(1) != y
    min_eps = torch.full((x.shape[0],), math.inf, device=x.device)
    min_eps[wrong] = 0.0
    x_min = x.detach().clone()
    for r in radii.tolist():
        todo = torch.isinf(min_eps).nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        x_adv = pgd(model, x[todo], y[todo], eps=r, alpha=step_factor * r / steps, steps=steps, norm=norm,
                    random_start=False, mode=mode)
        with torch.no_grad(), model_mode(model, mode):
            flipped = model(x_adv).argmax(1) != y[todo]
        min_eps[todo[flipped]] = r
        x_min[todo[flipped]] = x_adv[flipped]
    return min_eps, x_min


class MinimumPerturbation(EpochHistory, Callback):
    """Every ``every_n_epochs`` training epochs (and after the last), the minimum-perturbation distribution.

    The probe is the first ``probe_size`` samples of the validation data set, fixed for the whole run. For each
    probe sample :func:`minimum_eps` finds the smallest radius of the grid ``max_eps * i / num_eps``,
    ``i = 1..num_eps``, at which PGD-``steps`` makes the model misclassify it (0 if it is misclassified
    clean). Under DDP the probe is split across ranks (rank ``r`` takes samples ``r, r + W, ...``) and the
    per-sample radii are gathered, so the logged distribution equals a single-process run on the same probe.

    Logged (same value on every rank): ``minperturb/mean`` and ``minperturb/median`` of the radii with
    unflipped samples counted as ``max_eps`` (a lower bound), ``minperturb/unflipped_frac`` (no flip up to
    ``max_eps``), ``minperturb/robust_frac_at_train_eps`` (not flipped at any grid radius up to the module's
    training eps; exact when the training eps lies on the grid, as it does with the default ``max_eps``),
    ``minperturb/ds_would_select`` (below), and the TensorBoard histogram ``minperturb/eps`` of the radii.

    ``minperturb/ds_would_select``, the paper's Fig. 8 statistic: the *minimum adversarial examples* are the
    probe samples flipped at some radius up to ``max_eps``, each at its minimum radius (the clean input when
    it is misclassified clean). On each rank the last training batch of the epoch (b' clean rows) and its
    PGD examples from the module's ``train_attack`` form the DS pool of 2b' rows. The pool and the minimum
    adversarial examples are scored together, in one no-grad forward pass in the module's ``scoring_mode``,
    by per-sample cross-entropy against the true label. With ``k = fraction_count(2b', p_up)`` and ``tau``
    the k-th largest pool loss, a minimum adversarial example *would be selected* if its loss is at least
    ``tau`` (it would enter the top ``k`` if added to the pool alone). The statistic is the share of minimum
    adversarial examples that would be selected, counts summed over ranks (each rank uses its own batch).

    Cost: at most ``probe_size * num_eps * (steps + 1)`` forward passes and ``probe_size * num_eps * steps``
    backward passes per measurement (samples already flipped are not attacked again); printed at fit start.

    Args:
        probe_size: validation samples probed.
        every_n_epochs: measure after every this many training epochs (and after the last one).
        max_eps: largest radius, pixel units; ``None``: twice the module's ``train_attack.eps``.
        num_eps: grid radii; resolution ``max_eps / num_eps``.
        norm: ``"linf"`` or ``"l2"``; ``None``: the norm of the module's ``train_attack``.
        steps: PGD steps per radius.
        step_factor: PGD travel in units of the radius (step size ``step_factor * r / steps``).
        mode: model mode during the search.

    Raises:
        ValueError: for a non-positive ``probe_size``, ``every_n_epochs``, ``num_eps``, ``steps``,
            ``max_eps`` or ``step_factor``, an unknown ``norm`` or ``mode``; at fit start, a ``probe_size``
            larger than the validation set, no validation data, or no ``max_eps`` with a zero training eps.
    """

    def __init__(self, probe_size: int = 64, every_n_epochs: int = 1, max_eps: float | None = None,
                 num_eps: int = 12, norm: str | None = None, steps: int = 5, step_factor: float = 2.5,
                 mode: str = "eval") -> None:
        for name, value in (("probe_size", probe_size), ("every_n_epochs", every_n_epochs), ("num_eps", num_eps),
                            ("steps", steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
        for name, value in (("max_eps", max_eps), ("step_factor", step_factor)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}")
        if norm is not None and norm not in NORMS:
            raise ValueError(f"`norm` must be one of {NORMS} or None, got {norm!r}")
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
        self.probe_size = probe_size
        self.every_n_epochs = every_n_epochs
        self.max_eps = max_eps
        self.num_eps = num_eps
        self.norm = norm
        self.steps = steps
        self.step_factor = float(step_factor)
        self.mode = mode
        self.history: list[dict[str, Any]] = []
        self._probe: tuple[Tensor, Tensor] | None = None
        self._last_batch: tuple[Tensor, Tensor] | None = None

    @property
    def radii(self) -> Tensor:
        return torch.arange(1, self.num_eps + 1, dtype=torch.float64) * (self.max_eps / self.num_eps)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        attack = pl_module.train_attack
        if self.max_eps is None:
            if not attack.enabled:
                raise ValueError("MinimumPerturbation: set `max_eps`; the module's training eps is 0")
            self.max_eps = 2 * attack.eps
        self.norm = self.norm or attack.norm
        if self.norm == "linf" and self.max_eps > 1:
            raise ValueError(f"`max_eps` must be <= 1 for the linf norm: pixels lie in [0, 1], got {self.max_eps}")
        # Lightning loads validation loaders lazily; ask the same source the validation loop will use.
        source = trainer.fit_loop.epoch_loop.val_loop._data_source
        loader = source.dataloader() if source.is_defined() else None
        if loader is None:
            raise ValueError("MinimumPerturbation needs validation data: pass val_dataloaders or a datamodule")
        size = len(loader.dataset)
        if self.probe_size > size:
            raise ValueError(f"`probe_size`={self.probe_size} is larger than the validation set ({size} samples); "
                             f"lower `probe_size` to at most {size}")
        # Straight from the data set: the probe is the same whatever sampler the validation loader has.
        rank, world = trainer.global_rank, trainer.world_size
        x, y = default_collate([loader.dataset[i] for i in range(rank, self.probe_size, world)])
        self._probe = (x.to(pl_module.device), y.to(pl_module.device))
        rank_zero_info(
            f"MinimumPerturbation: probe {self.probe_size} validation samples, {self.num_eps} radii up to "
            f"{self.max_eps:g} ({self.norm}, resolution {self.max_eps / self.num_eps:g}), PGD-{self.steps} per "
            f"radius: at most {self.probe_size * self.num_eps * self.steps} sample gradient steps every "
            f"{self.every_n_epochs} epoch(s), split over {world} rank(s)"
        )

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        x, y, _ = unpack(batch)
        self._last_batch = (x.detach(), y.detach())

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and 0 < trainer.max_epochs <= epoch + 1  # -1: no last epoch
        if (epoch + 1) % self.every_n_epochs and not last:
            return
        model = pl_module.model
        x, y = self._probe
        local, x_min = minimum_eps(model, x, y, self.radii.to(x.device), norm=self.norm, steps=self.steps,
                                   step_factor=self.step_factor, mode=self.mode)
        eps = self._gather(trainer, pl_module, local)
        selected, found = self._would_select(pl_module, x_min[torch.isfinite(local)], y[torch.isfinite(local)])
        counts = trainer.strategy.reduce(torch.tensor([selected, found], dtype=torch.float64, device=x.device),
                                         reduce_op="sum")
        censored = eps.clamp(max=self.max_eps)
        train_eps = float(pl_module.train_attack.eps)
        values = {
            "minperturb/mean": float(censored.mean()),
            "minperturb/median": float(censored.quantile(0.5)),
            "minperturb/unflipped_frac": float(torch.isinf(eps).float().mean()),
            "minperturb/robust_frac_at_train_eps": float((eps > train_eps * (1 + 1e-6)).float().mean()),
        }
        if counts[1] > 0:
            values["minperturb/ds_would_select"] = float(counts[0] / counts[1])
        pl_module.log_dict(values, on_step=False, on_epoch=True)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_histogram("minperturb/eps", censored.cpu(), trainer.global_step)
        self.record(epoch, {"max_eps": self.max_eps, "num_eps": self.num_eps, "eps": censored.cpu().tolist(), **values})

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

    def _would_select(self, pl_module: L.LightningModule, x_min: Tensor, y_min: Tensor) -> tuple[int, int]:
        """How many of these minimum adversarial examples clear the DS threshold of the last training batch."""
        if self._last_batch is None or x_min.shape[0] == 0:
            return 0, 0
        xb, yb = self._last_batch
        model = pl_module.model
        attack = pl_module.train_attack
        if attack.enabled:
            gen = torch.Generator(device=xb.device).manual_seed(pl_module.seed)
            xb = torch.cat([xb, attack(model, xb, yb, generator=gen)])
            yb = torch.cat([yb, yb])
        with torch.no_grad(), model_mode(model, pl_module.scoring_mode):
            losses = selection.per_sample_loss(model(torch.cat([xb, x_min])), torch.cat([yb, y_min]))
        pool, probe = losses[: xb.shape[0]], losses[xb.shape[0]:]
        k = selection.fraction_count(pool.numel(), pl_module.p_up)
        tau = pool.topk(k).values[-1]
        return int((probe >= tau).sum()), probe.numel()
