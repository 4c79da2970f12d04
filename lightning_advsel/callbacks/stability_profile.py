"""The stability baseline (Dong, Liu and Shang 2021; the DS paper's reference [13]) as two callbacks.

:class:`StabilityProfile` runs during a PGD adversarial-training run and counts, for every training sample, the
epochs in which its training adversarial example was misclassified; it writes the counts to a JSON file when
fitting ends (:mod:`lightning_advsel.stability`). A second run trains from scratch on the most stable fraction
(the data modules' ``subset_file``); :class:`StabilityCost` prints that run's wall time plus the profiling
run's, the baseline's cost.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics import Metric
from typing_extensions import override

from lightning_advsel import distributed, selection, stability
from lightning_advsel.batch import index_of
from lightning_advsel.checks import check_path
from lightning_advsel.step import RECIPES, check_selection_module

DEFAULT_FILENAME = "stability_profile.json"


class EpochFlags(Metric):
    """Per-sample flags of one epoch, summed over DDP ranks: which samples were seen, which misclassified.

    ``update(index, wrong)`` takes the dataset indices ``(B,)`` of a batch and whether each row's adversarial
    example was misclassified ``(B,)``. ``compute()`` returns ``(wrong, seen)``, two boolean tensors of shape
    ``(num_samples,)``: a sample that appears several times in an epoch (a DDP sampler pads ranks to equal
    shares by repeating samples) counts once, as misclassified if any of its appearances was.
    """

    full_state_update = False

    def __init__(self, num_samples: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_samples = num_samples
        self.add_state("wrong", torch.zeros(num_samples, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("seen", torch.zeros(num_samples, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, index: Tensor, wrong: Tensor) -> None:
        self.seen.index_add_(0, index, torch.ones_like(index))
        self.wrong.index_add_(0, index, wrong.long())

    def compute(self) -> tuple[Tensor, Tensor]:
        return self.wrong > 0, self.seen > 0


class _FitClock:
    """Wall time of ``fit``, from ``on_fit_start`` to now, plus the time of the runs a checkpoint resumed."""

    _before_s = 0.0
    _start: float | None = None

    def _clock_start(self) -> None:
        self._start = time.perf_counter()

    def elapsed_s(self) -> float:
        """Seconds of fitting so far, earlier resumed segments included."""
        return self._before_s + (time.perf_counter() - self._start if self._start is not None else 0.0)


def check_profiled_module(pl_module: L.LightningModule) -> None:
    """Refuse a module whose training forward does not see the adversarial example of every training row.

    Raises:
        ValueError: naming the setting, for a module that is not an ``AdversarialSelectionModule``-like module
            with a recipe that attacks every row, an enabled ``train_attack`` and ``p_up`` = 1.
    """
    check_selection_module(pl_module, "StabilityProfile")
    settings = pl_module.settings
    recipe = RECIPES[settings.recipe]
    every_row = recipe.attack == "all" or (recipe.attack == "score" and settings.attack_frac == 1)
    if not every_row or not settings.train_attack.enabled:
        raise ValueError(
            f"StabilityProfile counts misclassified training adversarial examples, so the recipe must attack "
            f"every row; `recipe`={settings.recipe!r} with train_attack {settings.train_attack.describe()} "
            f"does not. Profile with `recipe: robust` (PGD adversarial training, the baseline's first run)"
        )
    if pl_module.p_up != 1:
        raise ValueError(
            f"StabilityProfile reads each adversarial example's logits from the training forward, which sees "
            f"every row only at `p_up`=1, got p_up={pl_module.p_up}; set `p_up: 1.0` (and no AdaptivePUp)"
        )


class StabilityProfile(_FitClock, Callback):
    """Counts, per training sample, the epochs in which its training adversarial example was misclassified.

    After every training batch it reads the module's ``last_selection``: the logits of the training forward
    (before the update) over the adversarial rows, and the batch's dataset indices. A sample is misclassified
    in an epoch when the arg-max of its adversarial example's logits is not its label. Flags of the running
    epoch are metric states summed over DDP ranks (ranks see disjoint rows) and folded into the counts at the
    end of each epoch; counts, the running epoch's flags and the wall time are in the checkpoint, so a resumed
    run ends with the counts of an uninterrupted one. When fitting ends, rank 0 writes the profile (JSON: the
    counts, ``epochs_seen``, the number of epochs, the data set size, the split seed and the run's wall time;
    see :func:`lightning_advsel.stability.write_profile`) for the data modules' ``subset_file``. The epoch's
    share of misclassified samples is logged as ``stability/misclassified_frac``.

    The module must attack every row and train on every adversarial example (``recipe: robust``, ``p_up: 1``),
    and the data module must yield indices (``return_index: true``): both are checked when fitting starts.

    Args:
        path: where to write the profile; ``None`` writes ``stability_profile.json`` in the trainer's log
            folder (``trainer.log_dir``).

    Raises:
        ValueError: for a ``path`` that is not a non-empty path; at fit start, for a data module that yields no
            indices, a module that does not train on the adversarial example of every row (see
            :func:`check_profiled_module`), or a checkpoint whose counts cover another data set size; during
            training, for a batch without indices or a step that trained on only some adversarial examples.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = check_path("path", path, "a file path for the profile", optional=True)
        self.flags: EpochFlags | None = None
        self.counts: Tensor | None = None
        self.epochs_seen: Tensor | None = None
        self.epochs = 0
        self.saved_path: Path | None = None
        self._loaded_flags: tuple[Tensor, Tensor] | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        data = trainer.datamodule
        if data is None or not getattr(data, "return_index", False) or not hasattr(data, "index_size"):
            raise ValueError(
                f"StabilityProfile needs training batches (x, y, index): use a data module of lightning_advsel with "
                f"`return_index: true` (--data.init_args.return_index true), got "
                f"{type(data).__name__ if data is not None else 'no data module'}"
                f"{' with return_index=False' if data is not None and hasattr(data, 'return_index') else ''}"
            )
        check_profiled_module(pl_module)
        n = int(data.index_size)
        self.flags = EpochFlags(n)
        if self.counts is None:
            self.counts = torch.zeros(n, dtype=torch.long)
            self.epochs_seen = torch.zeros(n, dtype=torch.long)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Checkpoint state has been loaded by now (after `setup`).
        n = self.flags.num_samples
        if self.counts.numel() != n:
            raise ValueError(
                f"StabilityProfile: the checkpoint's counts cover {self.counts.numel()} samples, the data module's "
                f"training split has {n}; resume with the data settings of the profiled run"
            )
        self.flags.to(pl_module.device)
        if self._loaded_flags is not None:
            self.flags.wrong, self.flags.seen = (t.to(pl_module.device) for t in self._loaded_flags)
            self._loaded_flags = None
        self._clock_start()

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        index = index_of(batch, getattr(pl_module, "batch_keys", None))
        if index is None:
            raise ValueError(
                "StabilityProfile: a training batch carries no dataset index; set `return_index: true` on the data "
                "module so that batches are (x, y, index), or give mapping batches an 'index' entry"
            )
        record = pl_module.last_selection
        # A skipped step (`nonfinite: skip`) leaves the previous batch's record in place: nothing to count.
        if record is None or record.index is not index:
            return
        adv = record.is_adv[record.selected]
        if not self._every_row_trained(record, adv):
            raise ValueError(
                f"StabilityProfile: step {trainer.global_step} trained on {int(adv.sum())} adversarial examples "
                f"of a batch of {record.batch_size}; every row's adversarial example must be trained (p_up=1, "
                f"recipe robust), was p_up changed during training?"
            )
        trained = selection.mask_indices(adv, record.batch_size)  # positions in `selected` of the adversarial rows
        rows = record.selected[trained]
        wrong = record.logits[trained].argmax(dim=1) != record.y[rows]
        self.flags.update(record.index[record.source[rows]], wrong)

    @staticmethod
    def _every_row_trained(record: Any, adv: Tensor) -> bool:
        """Whether the step trained on the adversarial example of every row of its batch, from the sizes the
        host knows (the attacked rows are the pool's adversarial rows) wherever they decide it, so that the
        profiled run's steps do not wait for the device; ``adv``: which selected rows are adversarial."""
        if record.logits is None or record.attacked.numel() != record.batch_size:
            return False
        if record.selected.numel() == record.is_adv.numel():  # the whole pool, so all of its adversarial rows
            return True
        return int(adv.sum()) == record.batch_size

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        distributed.settle_logged_values(trainer)  # before the flags' sum over ranks
        wrong, seen = (t.cpu() for t in self._synced_flags())
        self.flags.reset()
        self.counts += wrong.long()
        self.epochs_seen += seen.long()
        self.epochs += 1
        frac = float(wrong.sum()) / max(int(seen.sum()), 1)
        distributed.log_rank_wide(pl_module, {"stability/misclassified_frac": frac})

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        wall = self.elapsed_s()
        path = Path(self.path) if self.path is not None else Path(trainer.log_dir or ".") / DEFAULT_FILENAME
        if trainer.is_global_zero:
            data = trainer.datamodule
            stability.write_profile(path, stability.Profile(
                counts=self.counts, epochs_seen=self.epochs_seen, epochs=self.epochs,
                split_seed=int(getattr(data, "split_seed", 0)), wall_time_s=wall, data=type(data).__name__))
            rank_zero_info(f"stability profile of {self.counts.numel()} samples over {self.epochs} epochs "
                           f"(profiling run: {wall:.1f} s wall) written to {path}")
        self.saved_path = path

    def _synced_flags(self) -> tuple[Tensor, Tensor]:
        """The running epoch's flags summed over ranks (a collective: every rank calls it)."""
        with warnings.catch_warnings():
            # At an epoch's start a rank may not have updated yet; zero flags are the right answer then.
            warnings.filterwarnings("ignore", message=r".*compute.*before.*update.*")
            return self.flags.compute()

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.counts is None:
            return {}
        # Every rank saves (Lightning's checkpoint save is collective); each stores the flags of all ranks, and
        # since flags are folded as "any rank saw it", loading them on every rank counts each once.
        wrong, seen = self._synced_flags()
        return {"counts": self.counts.clone(), "epochs_seen": self.epochs_seen.clone(), "epochs": self.epochs,
                "epoch_wrong": wrong.cpu(), "epoch_seen": seen.cpu(), "wall_time_s": self.elapsed_s()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "counts" not in state_dict:
            return
        self.counts = state_dict["counts"].long().clone()
        self.epochs_seen = state_dict.get("epochs_seen", torch.zeros_like(self.counts)).long().clone()
        self.epochs = int(state_dict.get("epochs", 0))
        self._before_s = float(state_dict.get("wall_time_s", 0.0))
        if "epoch_wrong" in state_dict:
            self._loaded_flags = (state_dict["epoch_wrong"].long(), state_dict["epoch_seen"].long())


class StabilityCost(_FitClock, Callback):
    """Prints, when fitting ends, the stability baseline's cost: this run's wall time plus the profiling run's.

    The second run of the baseline trains on a subset read from a profile (the data module's ``subset_file``);
    its cost includes the profiling run, whose wall time the profile holds. Both are measured the same way,
    from ``on_fit_start`` to ``on_fit_end`` (training and validation, summed over resumed segments).
    ``total_s`` holds the sum after fitting.

    Raises:
        ValueError: at the start of training, for a data module that reads no ``subset_file``.
    """

    def __init__(self) -> None:
        self.total_s: float | None = None

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._clock_start()

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The training loader is built by now, and with it the subset (read from the file).
        if getattr(trainer.datamodule, "subset_profile", None) is None:
            raise ValueError(
                "StabilityCost adds the profiling run's wall time to this run's, so the data module must train on "
                "a stability profile: set `subset_file` (--data.init_args.subset_file PATH)"
            )

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        data = trainer.datamodule
        profiled, own = data.subset_profile.wall_time_s, self.elapsed_s()
        self.total_s = profiled + own
        rank_zero_info(
            f"stability baseline cost: profiling run {profiled:.1f} s (from {data.subset_file}) + this run "
            f"{own:.1f} s = {self.total_s:.1f} s wall"
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"wall_time_s": self.elapsed_s()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._before_s = float(state_dict.get("wall_time_s", 0.0))
