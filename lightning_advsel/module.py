"""The LightningModule around the training step: optimizer, scheduler, logging, checkpoint state.

What a training step does (attack, pool, selection, loss over the selected rows) is the functional core in
:mod:`lightning_advsel.step`; :class:`AdversarialSelectionModule` calls :func:`~lightning_advsel.step.adversarial_step`
once per batch and owns what Lightning needs around it: manual optimization, the per-step random generator,
the DDP scope of the selection, the metrics and logs, the non-finite policy and the resume state. The callbacks
read the module through :class:`~lightning_advsel.step.SelectionModule` (``model``, ``num_classes``,
``settings``, ``p_up``, ``last_selection``), which a user's own module can provide as well.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, replace
from typing import Any, Literal, get_args

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import StochasticWeightAveraging
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_advsel import checks, cost, dashboard, distributed, schedules, selection
from lightning_advsel.attacks import AttackConfig, Mode, model_mode
from lightning_advsel.batch import check_keys, index_in, inputs_and_labels, unpack
from lightning_advsel.checks import check_checkpoint_file
from lightning_advsel.evaluation import AutoAttackConfig
from lightning_advsel.metrics import SyncFreeMean
from lightning_advsel.models import Normalize
from lightning_advsel.objectives import Objective, ObjectiveName
from lightning_advsel.step import (
    LOCAL,
    RECIPES,
    CleanRows,
    GlobalScope,
    RecipeName,
    SelectionForward,
    SelectionRecord,
    StepResult,
    StepSettings,
    adversarial_step,
    default_p_up,
)

__all__ = ["RECIPES", "AdversarialSelectionModule", "SelectionRecord", "default_p_up"]


Nonfinite = Literal["raise", "skip"]
NONFINITE = get_args(Nonfinite)
Interval = Literal["epoch", "step"]
ClipAlgorithm = Literal["norm", "value"]
WarmupPick = Literal["all", "random"]
Auto = Literal["auto"]
AUTO: Auto = "auto"  # `eval_attack`'s default: PGD-20 at the training attack's radius (see the constructor)
EVAL_KINDS = ("acc_clean", "acc_robust", "loss_clean")  # what each validation / test loader logs, as {stage}/{kind}


def _as_attack(name: str, value: AttackConfig | dict | None) -> AttackConfig | None:
    if value is None or isinstance(value, AttackConfig):
        return value
    if isinstance(value, dict):
        try:
            return AttackConfig(**value)
        except TypeError as err:
            raise ValueError(f"`{name}` has an unknown key: {err}") from err
    raise ValueError(f"`{name}` must be an AttackConfig or a dict of its fields, got {type(value).__name__}")


def _as_test_attack(value: AttackConfig | AutoAttackConfig | dict | None,
                    name: str = "test_attack") -> AttackConfig | AutoAttackConfig | None:
    """``test_attack`` (or ``name``) from a config or from a checkpoint's dict (AutoAttack's dict has a ``version``)."""
    if isinstance(value, AutoAttackConfig):
        return value
    if isinstance(value, dict) and "version" in value:
        try:
            return AutoAttackConfig(**value)
        except TypeError as err:
            raise ValueError(f"`{name}` has an unknown key for AutoAttackConfig: {err}") from err
    if value is not None and not isinstance(value, (AttackConfig, dict)):
        raise ValueError(
            f"`{name}` must be an AttackConfig, an AutoAttackConfig or a dict of either's fields, "
            f"got {type(value).__name__}"
        )
    return _as_attack(name, value)


def _as_normalization(value: Any) -> Normalize | None:
    """``input_normalization`` as a :class:`Normalize`, whose checks on the statistics it reports under its name.

    Raises:
        ValueError: unless ``value`` is ``None`` or a pair ``(mean, std)`` of lists that :class:`Normalize` takes.
    """
    if value is None:
        return None
    expected = "a pair (mean, std) of per-channel lists in pixel units, e.g. [[0.49, 0.48, 0.45], [0.25, 0.24, 0.26]]"
    if (isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2
            or not all(isinstance(v, Sequence) and not isinstance(v, (str, bytes)) for v in value)):
        raise ValueError(f"`input_normalization` must be {expected}, got {value!r}")
    mean, std = value
    try:
        normalize = Normalize(mean, std)
    except ValueError as err:
        raise ValueError(f"`input_normalization` (mean, std): {err}") from err
    return normalize


class AdversarialSelectionModule(L.LightningModule):
    """Adversarial training with data selection around any ``nn.Module`` classifier.

    The classifier takes inputs in [0, 1] (normalization is inside it) and returns logits of shape
    ``(B, num_classes)``; for a data module that already normalizes, set ``input_normalization``. Optimization
    is manual: the module runs the attack, the selection, the backward pass over the selected rows and the
    optimizer and scheduler steps.

    With several validation (or test) dataloaders every loader has its own accuracies, logged under Lightning's
    ``dataloader_idx`` keys (``val/acc_clean/dataloader_idx_0``, ``val/acc_robust/dataloader_idx_1``, ...); with
    one loader the keys are ``val/acc_clean`` and ``val/acc_robust``.

    Args:
        model: the classifier to train.
        recipe: ``"standard"`` (clean only), ``"robust"`` (adversarial only, Madry PGD-AT), ``"ds"`` (pool of
            the clean batch and its PGD examples, top ``p_up`` by loss backpropagated), ``"random"`` (same
            pool, random ``p_up`` fraction), ``"selective"`` (attack only the top ``attack_frac`` by
            ``attack_score``; robust loss on those, clean loss on the rest), ``"selective_ds"`` (attack as
            selective, then DS selection over clean batch plus adversarial examples).
        p_up: fraction of the pool that is backpropagated, in (0, 1]. Callbacks may change it per epoch.
            ``None`` (default) takes the recipe's default, :func:`default_p_up`: 0.5 for the recipes whose pool
            appends the adversarial rows to the clean batch (``ds``, ``random``, ``selective_ds``), 1.0 for
            the others (``standard``, ``robust``, ``selective``), which would otherwise drop rows silently.
        attack_frac: fraction of the clean batch attacked by the selective recipes, in (0, 1].
        attack_score: pre-attack score of the selective recipes, a key of
            :data:`lightning_advsel.selection.PRE_ATTACK_SCORES`.
        train_attack: the attack that makes training examples. Defaults to PGD-10, L-inf eps 0.1, alpha
            0.025, in ``"train"`` mode (batch statistics, BatchNorm running statistics frozen).
        eval_attack: the attack for ``val/acc_robust`` (every validation epoch). ``"auto"`` (default) is PGD-20
            at the training attack's ``eps`` and ``norm``, alpha 0.01, in ``"eval"`` mode. ``None`` skips robust
            evaluation: no ``val/acc_robust``, and no ``test/acc_robust`` unless ``test_attack`` is set.
        test_attack: the attack for ``test/acc_robust``: an ``AttackConfig`` or an
            :class:`~lightning_advsel.evaluation.AutoAttackConfig` (torchattacks' AutoAttack, seeded per
            batch). ``None`` (default) uses ``eval_attack`` (and so skips robust testing when that is ``None``).
        num_classes: classes of the task.
        optimizer: optimizer factory, called with the model parameters; its learning rate is :attr:`lr` unless
            that is set (``Tuner(trainer).lr_find(module)`` sets it).
        lr_scheduler: optional scheduler factory, called with the optimizer. A ``ReduceLROnPlateau`` follows its
            ``monitor`` (``lightning.pytorch.cli.ReduceLROnPlateau``), stepped at the end of each training epoch
            with the value logged last (the epoch's validation where it ran one).
        scheduler_interval: step the scheduler every ``"epoch"`` or every ``"step"``.
        scoring_mode: model mode of the no-grad scoring passes (see :func:`~lightning_advsel.attacks.model_mode`).
        seed: seed of the per-step random generator (PGD starts, random selection). The generator is
            reseeded from ``(seed, global_step, global_rank)`` each step, so a resumed run draws the same.
        selection_scope: under DDP, ``"local"`` (each rank backpropagates the top ``p_up`` of its own pool)
            or ``"global"`` (ranks all-gather their scores and agree on the top ``p_up`` of the global pool;
            the update equals a single-process step on the concatenated batch). See
            :mod:`lightning_advsel.distributed`. Under ``"global"`` ranks may select different numbers of
            rows, which breaks SyncBatchNorm's equal-size contract, so SyncBatchNorm is refused at fit start;
            under ``"local"`` equal batch sizes per rank give equal selected counts.
        nonfinite: what a NaN or inf in an input batch or in the training loss does: ``"raise"`` stops
            training with an error naming the global step and batch index; ``"skip"`` drops that step on
            every rank (no update), counts it in ``skipped_steps`` (saved in checkpoints) and logs
            ``train/skipped_steps``. The decision is agreed across ranks, so ranks never diverge.
        objective: the training objective (:mod:`lightning_advsel.objectives`): ``"ce"`` (cross-entropy),
            ``"trades"`` or ``"mart"``. TRADES and MART pair each sample's clean input with its adversarial
            example; the selection rules then pick pairs (``ds``: the top ``p_up`` of the batch's pairs by their
            objective; ``random``: random pairs; ``selective``: pairs for the attacked rows, clean
            cross-entropy for the others); ``standard`` and ``selective_ds`` refuse them.
        objective_weight: ``beta`` of TRADES (default 6) or ``lambda`` of MART (default 5); ``None`` for ``"ce"``.
        label_smoothing: label smoothing of the ``"ce"`` objective's training loss, in [0, 1).
        attack_sampling: ``"top"`` attacks the best-scored ``attack_frac`` of the batch; ``"proportional"`` draws
            them with probability proportional to ``1 / |margin|`` (margin scores only).
        clean_weight: weight of the clean rows' loss among the backpropagated rows (see
            :class:`~lightning_advsel.step.StepSettings`); 1 is the plain mean.
        attack_warmup_epochs: epochs at the start in which the selective recipes attack every row
            (``attack_frac`` 1); 0 (default) for none.
        selection_forward: ``"separate"`` (default; no-grad scoring, then forward and backward of the selected
            rows only) or ``"shared"`` (one forward with gradients over the pool, loss over the selected rows):
            see :class:`~lightning_advsel.step.StepSettings`.
        clean_rows: ``"unattacked"`` (default) or ``"all"``: which clean inputs the selective recipe trains on,
            see :class:`~lightning_advsel.step.StepSettings`.
        attack_warmup: what the selective recipes attack during ``attack_warmup_epochs``: ``"all"`` (every row)
            or ``"random"`` (a random ``attack_frac`` of the batch, as the selective authors' script does).
        batch_keys: ``(input key, label key)`` of mapping batches such as ``{"image": x, "label": y, "index": i}``
            (:mod:`lightning_advsel.batch`); required for them. Sequence batches ``(x, y, *extra)`` are read by
            position. Other entries pass through to the callbacks; an ``"index"`` entry becomes
            ``last_selection.index``.
        input_normalization: ``(mean, std)`` per channel, pixel units, when the data module yields normalized
            inputs ``(pixels - mean) / std`` and ``model`` expects them. Every step maps inputs back to pixels,
            attacks them there (so every ``eps`` stays in pixel units) and gives ``model`` the attacked pixels
            normalized again, through :class:`~lightning_advsel.Normalize`. ``model`` stays the user's network
            on normalized inputs (``module.model``, ``module(x)`` and the checkpoint's ``model.*`` weights);
            :attr:`pixel_model` is the classifier on pixels. ``None`` (default): inputs are pixels in [0, 1].
        gradient_clip_val: clip the gradients before each optimizer step at this value (``None`` or 0: no
            clipping); the Trainer's argument of the same name, which Lightning refuses under manual optimization.
        gradient_clip_algorithm: ``"norm"`` (the total norm of all gradients) or ``"value"`` (each element).
        accumulate_grad_batches: step the optimizer (and a ``"step"`` scheduler) every this many batches; the
            Trainer's argument of the same name, which Lightning refuses under manual optimization. Each batch's
            loss is divided by it, as Lightning does, so the window's update is one step over the union of its
            batches; the last window of an epoch steps with the batches it has. The attack, the selection
            (``p_up``) and its statistics stay per batch. Under DDP only the window's closing backward
            all-reduces (``no_sync`` before it).
        predict_attack: the attack behind ``predict``'s adversarial predictions (see :meth:`predict_step`), of the
            same kinds as ``test_attack``. ``None`` (default): clean predictions only, since an attack costs
            ``steps + 1`` forward and backward passes per batch where a prediction costs one forward pass.
        channels_last: store the model's 4-D weights in the channels-last memory format (convolutions then
            run in NHWC, which GPU tensor cores prefer under mixed precision; inputs follow from the first
            convolution). Off by default: it changes the order of floating-point sums, so numbers differ
            slightly from the default layout's; ``configs/trainer/gpu_bf16.yaml`` turns it on.
        compile_model: compile the model's forward with ``torch.compile`` (``nn.Module.compile``, so the state
            dict keys do not change) when the Trainer sets the module up. Only the network is compiled, not
            the step: the selection's sizes depend on the data, the network's shapes settle after the first
            step (every PGD step then reuses the compiled graph). Off by default.
        eps_warmup_epochs: epochs (fractions allowed) over which the training attack's ``eps`` and ``alpha``
            rise linearly, batch by batch, from ``1 / N`` of their value at the first of an epoch's ``N`` batches
            to their value (:func:`~lightning_advsel.schedules.warmup_factor`); logged as ``train/eps``. Robust
            training from scratch at a large radius can stay at a constant prediction; a ramp starts it from
            near-clean examples. 0 (default): the full radius from the first step. The validation, test and
            prediction attacks keep their radius; the ramp follows the epoch and batch index, so a resumed run
            continues it.

    Raises:
        ValueError: for an unknown ``recipe``, ``attack_score``, ``scoring_mode`` or ``scheduler_interval``,
            ``p_up`` or ``attack_frac`` outside (0, 1], ``num_classes`` below 2, a ``model`` that is not an
            ``nn.Module``, ``attack_score="gradmatch"`` (closed form) on a model without an ``nn.Linear`` head
            (``"gradmatch_exact"`` works on any model), a bad attack setting, an unknown ``selection_scope`` or
            ``nonfinite``, ``batch_keys`` that are not two different keys, an ``input_normalization`` that is
            not ``(mean, std)`` of equal lengths with positive ``std``, a negative ``gradient_clip_val``, an
            unknown ``gradient_clip_algorithm``, ``accumulate_grad_batches`` below 1, a ``channels_last`` or
            ``compile_model`` that is not a bool, a negative ``eps_warmup_epochs``; at fit start, a Trainer with
            ``gradient_clip_val`` or ``accumulate_grad_batches`` set (the message names these arguments); at the
            first batch, a ``model`` whose output is not ``(B, num_classes)``, a mapping batch without the
            ``batch_keys`` entries, or (for a recipe that attacks, and for validation and testing with an attack)
            inputs outside [0, 1] (see :meth:`~lightning_advsel.attacks.AttackConfig.check_batch`); at any
            validation or test batch with an attack, NaN or inf inputs on any rank (every rank raises); when
            loading a checkpoint, one written for a different model architecture.
        ImportError: for an AutoAttack ``test_attack`` when the optional torchattacks is not installed (the
            message names the pip command).
    """

    def __init__(
        self,
        model: nn.Module,
        recipe: RecipeName = "ds",
        p_up: float | None = None,
        attack_frac: float = 0.5,
        attack_score: selection.AttackScore = "margin",
        train_attack: AttackConfig | None = None,
        eval_attack: AttackConfig | Auto | None = AUTO,
        test_attack: AutoAttackConfig | AttackConfig | None = None,  # this order: see evaluation._ByClassPath
        num_classes: int = 10,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Interval = "epoch",
        scoring_mode: Mode = "train",
        seed: int = 0,
        selection_scope: distributed.Scope = "local",
        nonfinite: Nonfinite = "raise",
        objective: ObjectiveName = "ce",
        objective_weight: float | None = None,
        label_smoothing: float = 0.0,
        attack_sampling: selection.AttackSampling = "top",
        clean_weight: float = 1.0,
        attack_warmup_epochs: int = 0,
        selection_forward: SelectionForward = "separate",
        clean_rows: CleanRows = "unattacked",
        attack_warmup: WarmupPick = "all",
        batch_keys: tuple[str, str] | None = None,
        input_normalization: tuple[Sequence[float], Sequence[float]] | None = None,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: ClipAlgorithm = "norm",
        accumulate_grad_batches: int = 1,
        predict_attack: AutoAttackConfig | AttackConfig | None = None,
        channels_last: bool = False,
        compile_model: bool = False,
        eps_warmup_epochs: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model` must be an nn.Module classifier, got {type(model).__name__}")
        checks.check_choice("recipe", recipe, RECIPES)
        self.settings = StepSettings(
            recipe=recipe, p_up=default_p_up(recipe) if p_up is None else p_up, attack_frac=attack_frac,
            attack_score=attack_score, scoring_mode=scoring_mode,
            train_attack=_as_attack("train_attack", train_attack) or AttackConfig(mode="train"),
            objective=Objective(objective, objective_weight, label_smoothing),
            attack_sampling=attack_sampling, clean_weight=clean_weight, selection_forward=selection_forward,
            clean_rows=clean_rows,
        )
        self.attack_warmup = checks.check_choice("attack_warmup", attack_warmup, get_args(WarmupPick))
        if clean_rows == "all" and selection_scope == "global":
            raise ValueError("`clean_rows`='all' takes the mean of each part on each rank; it has no global form, "
                             "use `selection_scope`='local'")
        self.attack_warmup_epochs = checks.check_int("attack_warmup_epochs", attack_warmup_epochs, 0)
        self.eps_warmup_epochs = checks.check_number("eps_warmup_epochs", eps_warmup_epochs, 0.0, unit="epochs")
        self.batch_keys = check_keys(batch_keys)
        normalize = _as_normalization(input_normalization)
        self.channels_last = checks.check_bool("channels_last", channels_last)
        self.compile_model = checks.check_bool("compile_model", compile_model)
        if selection.PRE_ATTACK_SCORES[attack_score].needs_features:
            selection.last_linear(model, who=f"`attack_score`={attack_score!r}")
        checks.check_choice("scheduler_interval", scheduler_interval, get_args(Interval))
        checks.check_int("num_classes", num_classes, 2)
        checks.check_int("seed", seed, 0)
        checks.check_choice("selection_scope", selection_scope, distributed.SCOPES)
        checks.check_choice("nonfinite", nonfinite, NONFINITE)
        if gradient_clip_val is not None:
            checks.check_number("gradient_clip_val", gradient_clip_val, 0.0)
        checks.check_choice("gradient_clip_algorithm", gradient_clip_algorithm, get_args(ClipAlgorithm))
        checks.check_int("accumulate_grad_batches", accumulate_grad_batches, 1)
        if isinstance(eval_attack, str) and eval_attack != AUTO:
            raise ValueError(f"`eval_attack` must be an AttackConfig, a dict of its fields, {AUTO!r} or None, "
                             f"got {eval_attack!r}")
        if eval_attack == AUTO:  # resolved before save_hyperparameters: a checkpoint holds the attack itself
            train = self.settings.train_attack
            eval_attack = AttackConfig(eps=train.eps, alpha=0.01, steps=20, norm=train.norm)
        self.eval_attack = _as_attack("eval_attack", eval_attack)
        self.test_attack = _as_test_attack(test_attack)
        self.predict_attack = _as_test_attack(predict_attack, "predict_attack")

        with warnings.catch_warnings():
            # Lightning warns that `model` is an nn.Module; it is dropped just below when built from Python.
            warnings.filterwarnings("ignore", message=r"Attribute 'model' is an instance of `nn.Module`")
            self.save_hyperparameters()
        if isinstance(self.hparams.get("model"), nn.Module):
            # Built from Python, not from the CLI: keep only plain values in the checkpoint (the weights are in
            # the state dict); load with `load_from_checkpoint(path, model=Net())`.
            self.remove_ignored_hparams(["model", "optimizer", "lr_scheduler"])
            # Lightning also keeps a deep copy of the first hyperparameters (`hparams_initial`), which held the
            # network itself: a second copy of its weights for the module's lifetime. Saving the plain values
            # again replaces that copy.
            self.save_hyperparameters(dict(self.hparams))
        # A setting of `predict`, not of the trained model: kept out of the checkpoint, whose hyperparameters the
        # command line applies over its own when it loads one (`predict --ckpt_path ...` takes `predict_attack`).
        self.remove_ignored_hparams(["predict_attack"])
        for key in ("train_attack", "eval_attack", "test_attack"):
            if isinstance(self.hparams.get(key), (AttackConfig, AutoAttackConfig)):
                self.hparams[key] = asdict(self.hparams[key])

        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.input_normalization = normalize
        self._compiled = False
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self._lr: float | None = None  # the optimizer's learning rate when set (`lr`), else the factory's
        self.lr_scheduler_factory = lr_scheduler
        self.scheduler_interval = scheduler_interval
        self.seed = seed
        self.automatic_optimization = False
        self.last_selection: SelectionRecord | None = None
        self.selection_scope = selection_scope
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self._model_checked = False
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.accumulate_grad_batches = accumulate_grad_batches
        # The accumulation window (checkpointed): batches seen since the last optimizer step, whether any of them
        # was backpropagated, and gradients restored from a checkpoint taken inside a window.
        self.batches_trained = 0  # every training batch, skipped ones included: seeds the step under accumulation
        self._window_batches = 0
        self._window_has_grads = False
        # Under DDP only the window's closing backward all-reduces; the batches before it accumulate this rank's
        # gradients unsynced (DDP's ``no_sync``), and this says whether such local sums are pending.
        self._grads_unsynced = False
        self._restored_grads: list[Tensor | None] | None = None
        self._attack_checked: set[str] = set()  # the stages ("train", "val", "test") whose first batch was checked

        # The mean training loss over the selected rows: a metric so that its epoch value is the mean over ranks
        # (synced once, at the epoch's end) while its step value stays this rank's (no per-step collective).
        # No training metric makes the host wait for the device (see lightning_advsel.metrics).
        self.train_loss = SyncFreeMean()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.train_acc_selected = MulticlassAccuracy(num_classes, average="micro")
        self.train_adv_frac = SyncFreeMean()
        self.train_clean_frac = SyncFreeMean()
        self.train_attacked_frac = SyncFreeMean()
        self.train_attack_score_selected = SyncFreeMean()
        self.train_attack_score_unselected = SyncFreeMean()
        # The first validation and test loader's metrics (see _new_eval_metrics); those of the second and further
        # loaders are made when first met.
        self.val_acc_clean, self.val_acc_robust, self.val_loss_clean = self._new_eval_metrics()
        self.test_acc_clean, self.test_acc_robust, self.test_loss_clean = self._new_eval_metrics()
        self.eval_metrics = nn.ModuleDict()
        # The run's work since it started (checkpointed), and its totals when training ended (for the summary).
        self.work = cost.WorkCounter()
        self.work_totals: dict[str, int] | None = None
        self._epoch_started = time.perf_counter()

    @property
    def p_up(self) -> float:
        """Fraction of the pool backpropagated. Written by the constructor, by a callback such as
        :class:`~lightning_advsel.callbacks.AdaptivePUp` at the start of an epoch, and when a checkpoint is
        restored; every write is checked (a value outside (0, 1] raises ``ValueError``)."""
        return self.settings.p_up

    @p_up.setter
    def p_up(self, value: float) -> None:
        self.settings = replace(self.settings, p_up=value)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    @property
    def pixel_model(self) -> nn.Module:
        """The classifier on pixels in [0, 1], which every attack sees: ``model``, after ``Normalize`` when
        ``input_normalization`` is set (built on each call, so it holds no weights of its own)."""
        if self.input_normalization is None:
            return self.model
        return nn.Sequential(self.input_normalization, self.model)

    def to_pixels(self, x: Tensor) -> Tensor:
        """A batch's inputs as pixels: unchanged, or mapped back from ``input_normalization``."""
        return x if self.input_normalization is None else self.input_normalization.inverse(x)

    def read_batch(self, batch: Any) -> tuple[Tensor, Tensor, tuple[Any, ...] | dict[str, Any]]:
        """``(x, y, extra)`` of a batch (:func:`~lightning_advsel.batch.unpack` with ``batch_keys``), in pixels."""
        x, y, extra = unpack(batch, self.batch_keys)
        return self.to_pixels(x), y, extra

    # ----------------------------------------------------------------------------------------------- training
    def _generator(self, device: torch.device, offset: int) -> torch.Generator:
        gen = torch.Generator(device=device)
        gen.manual_seed((self.seed * 1_000_003 + offset * 7919 + self.global_rank) % (2**63 - 1))
        return gen

    def _labels(self, y: Tensor, batch_idx: int) -> Tensor:
        """The batch's labels as int64 class indices (any integer dtype is accepted), or a clear error."""
        if not isinstance(y, Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            got = y.dtype if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"batch {batch_idx} has labels of type {got}; labels must be integer class indices "
                             f"(torch.long, or any integer dtype)")
        return y.long()  # cross-entropy takes int64 targets only

    def _labels_out_of_range(self, y: Tensor) -> Tensor:
        """On the labels' device, without a host synchronisation: whether a label lies outside [0, num_classes)."""
        return ((y < 0) | (y >= self.num_classes)).any()

    def _agree(self, flags: Tensor, counts: Sequence[int] = ()) -> tuple[list[bool], list[bool], list[int]]:
        """This rank's flags, whether any rank raised each, and ``counts`` summed over ranks: one all-reduce and
        one copy to the host, the call's only wait for the device (the counts reach it as kernel arguments, not as
        a copy from the host, which would be a second wait)."""
        mine = torch.cat([flags.long(), *(flags.new_full((1,), c, dtype=torch.long) for c in counts)])
        anyone = distributed.sum_over_ranks(self.trainer.strategy, mine.clone())
        local, total = torch.stack([mine, anyone]).tolist()
        n = flags.numel()
        return [bool(v) for v in local[:n]], [bool(v) for v in total[:n]], total[n:]

    def _refuse_labels(self, y: Tensor, batch_idx: int, mine: bool, anyone: bool) -> None:
        """Raise on every rank when any rank's labels are out of range (agreed by :meth:`_agree`)."""
        if not anyone:
            return
        # Every rank raises: a rank raising alone would leave the others waiting in the next collective.
        if not mine:
            raise ValueError(f"batch {batch_idx} has labels outside [0, {self.num_classes - 1}] on another rank")
        raise ValueError(
            f"batch {batch_idx} has labels in [{int(y.min())}, {int(y.max())}], "
            f"outside [0, {self.num_classes - 1}] "
            f"for `num_classes`={self.num_classes}"
        )

    def _check_batch(self, y: Tensor, batch_idx: int) -> Tensor:
        """The batch's labels as int64 class indices, checked in range on every rank, or a clear error."""
        y = self._labels(y, batch_idx)
        mine, anyone, _ = self._agree(self._labels_out_of_range(y).reshape(1))
        self._refuse_labels(y, batch_idx, mine[0], anyone[0])
        return y

    def _step_offset(self) -> int:
        """What seeds a training batch's generator: the optimizer step, or under accumulation (where the step
        stays put for a window of batches) the count of training batches."""
        return self.global_step if self.accumulate_grad_batches == 1 else self.batches_trained

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        x, y, extra = self.read_batch(batch)
        self._check_model_output(x)
        y = self._labels(y, batch_idx)
        # Both input checks in one agreement, before any work; the non-finite policy decides first, as before.
        mine, anyone = self._agree_on_inputs(x, y)
        trained = None
        if not self._nonfinite_step(mine[0], anyone[0], "input", batch_idx):
            self._refuse_labels(y, batch_idx, mine[1], anyone[1])
            attacks = RECIPES[self.settings.recipe].attack != "none" and self.settings.train_attack.enabled
            self._check_attack_batch("train", self.settings.train_attack if attacks else None, x, y)
            trained = self._train_batch(x, y, batch_idx)
        self._end_batch()
        if trained is None:
            return None
        out, step_work = trained
        self.last_selection = replace(out.record, index=index_in(extra))
        self._log_train(out, step_work)
        return out.loss.detach()

    def _train_batch(self, x: Tensor, y: Tensor, batch_idx: int) -> tuple[StepResult, list[int]] | None:
        """Attack, select and backpropagate one batch; ``None`` when its loss was not finite and it was skipped,
        else the step and its work summed over ranks (in :data:`lightning_advsel.cost.COUNTERS` order)."""
        scope = GlobalScope(self.trainer.strategy) if self.selection_scope == "global" else LOCAL
        settings = self.settings
        if self.current_epoch < self.attack_warmup_epochs:  # the first epochs attack every row, or random ones
            settings = (replace(settings, attack_frac=1.0) if self.attack_warmup == "all"
                        else replace(settings, attack_score="random", attack_sampling="top"))
        if self.eps_warmup_epochs:  # the radius ramp: a smaller ball early in training
            settings = replace(settings, train_attack=settings.train_attack.scaled(self._eps_factor(batch_idx)))
            self.log("train/eps", self._scalar(settings.train_attack.eps), on_step=True, on_epoch=False)
        out = adversarial_step(self.pixel_model, x, y, settings, self._generator(x.device, self._step_offset()), scope)
        # One all-reduce decides the finite-loss policy and sums the step's work over ranks for the cost log.
        work = [getattr(out.cost, name) for name in cost.COUNTERS]
        mine, anyone, step_work = self._agree(~torch.isfinite(out.loss).reshape(1), work)
        if self._nonfinite_step(mine[0], anyone[0], "loss", batch_idx, out.loss):
            return None
        if not self._window_has_grads:
            self.optimizers().zero_grad()
        n = self.accumulate_grad_batches
        if n == 1:
            self.manual_backward(out.loss)
        elif self._window_batches + 1 < n and not self.trainer.is_last_batch:
            # Not the window's last batch: DDP need not all-reduce yet (the closing backward averages the sum).
            with self._no_grad_sync():
                self.manual_backward(out.loss / n)
            self._grads_unsynced = distributed.world_size(self.trainer.strategy) > 1
        else:
            self.manual_backward(out.loss / n)
            self._grads_unsynced = False
        self._window_has_grads = True
        return out, step_work

    def _eps_factor(self, batch_idx: int) -> float:
        """The radius ramp's factor at this batch: epochs done, counting it (whole epochs when the loader has no
        length)."""
        batches = self.trainer.num_training_batches
        within = (batch_idx + 1) / batches if math.isfinite(batches) and batches > 0 else 1.0
        return schedules.warmup_factor(self.current_epoch + within, self.eps_warmup_epochs)

    def _no_grad_sync(self) -> AbstractContextManager:
        """DDP's ``no_sync`` for a backward inside an accumulation window (nothing on a single device)."""
        block = getattr(self.trainer.strategy, "block_backward_sync", None)
        return block() if block is not None else nullcontext()

    def _sync_window_grads(self) -> None:
        """Average over ranks the gradients that unsynced backwards left (the closing batch was skipped, or a
        checkpoint is taken inside the window): after it every rank holds what DDP's all-reduce would give."""
        if self._grads_unsynced:
            params = [p for p in self.model.parameters() if p.requires_grad]
            distributed.average_grads_over_ranks(self.trainer.strategy, params)
            self._grads_unsynced = False

    def _end_batch(self) -> None:
        """Count the batch in its accumulation window; at the window's end (or the epoch's last batch), clip and
        step the optimizer (and a ``"step"`` scheduler) if any batch of the window was backpropagated."""
        self.batches_trained += 1
        self._window_batches += 1
        if self._window_batches < self.accumulate_grad_batches and not self.trainer.is_last_batch:
            return
        if self._window_has_grads:
            self._sync_window_grads()
            opt = self.optimizers()
            if self.gradient_clip_val:
                self.clip_gradients(opt, gradient_clip_val=self.gradient_clip_val,
                                    gradient_clip_algorithm=self.gradient_clip_algorithm)
            opt.step()
            self._step_scheduler("step")
        self._window_batches, self._window_has_grads = 0, False

    @override
    def on_train_start(self) -> None:
        # The gradients of a window that a checkpoint interrupted, now that the model is on its device.
        if self._restored_grads is None:
            return
        for param, grad in zip(self.model.parameters(), self._restored_grads, strict=True):
            param.grad = None if grad is None else grad.to(param.device)
        self._restored_grads = None

    def _nonfinite_step(self, bad: bool, anyone: bool, what: str, batch_idx: int, loss: Tensor | None = None) -> bool:
        """Given whether this rank (``bad``) and any rank met a NaN or inf (agreed by :meth:`_agree`), raise on every
        rank or count a skip (returns True)."""
        if not anyone:
            return False
        where = f"global step {self.global_step}, batch {batch_idx}"
        if self.nonfinite == "raise":
            hint = "; set `nonfinite: skip` to drop such steps instead"
            if what == "input":
                raise ValueError(
                    f"training batch {batch_idx} (global step {self.global_step}) holds NaN or inf inputs"
                    f"{'' if bad else ' on another rank'}; inputs must be finite pixels in [0, 1]{hint}"
                )
            value = loss.item() if loss is not None and bad else "non-finite on another rank"
            raise FloatingPointError(
                f"training loss is {value} at global step {self.global_step} (batch {batch_idx}); "
                f"lower the learning rate or check the data{hint}"
            )
        self.skipped_steps += 1
        rank_zero_warn(f"skipped a training step ({where}): non-finite {what}; {self.skipped_steps} skipped so far")
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False, batch_size=1)
        return True

    def _agree_on_inputs(self, x: Tensor, y: Tensor) -> tuple[list[bool], list[bool]]:
        """Whether this rank's and any rank's batch holds non-finite inputs (first) and labels out of range
        (second): one agreement (:meth:`_agree`) for both."""
        mine, anyone, _ = self._agree(torch.stack([~torch.isfinite(x).all(), self._labels_out_of_range(y)]))
        return mine, anyone

    def _check_attack_batch(self, stage: str, attack: AttackConfig | None, x: Tensor, y: Tensor) -> None:
        """Once per process and stage: pgd's checks of a batch (pixels in [0, 1]) for ``attack`` (``None``: the
        stage attacks nothing); the stage's attack then runs unchecked."""
        if stage in self._attack_checked:
            return
        if attack is not None:
            attack.check_batch(x, y)
        self._attack_checked.add(stage)

    def _check_model_output(self, x: Tensor) -> None:
        """Once per process: the model maps a batch to ``(B, num_classes)`` logits, else a clear error."""
        if self._model_checked or x.shape[0] == 0:
            return
        model = self.pixel_model
        with torch.no_grad(), model_mode(model, "eval"):
            out = model(x[:1])
        expected = (1, self.num_classes)
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        if got != expected:
            raise ValueError(
                f"`model` must return logits of shape (batch, num_classes) = {expected} for an input of shape "
                f"{tuple(x[:1].shape)}, got {got}; check the model's last layer and `num_classes`"
            )
        self._model_checked = True

    @override
    def configure_callbacks(self) -> list[L.Callback]:
        # Lightning checks the Trainer against manual optimization right after this hook, with a message that
        # names the Trainer's arguments only; a user of this module needs to hear where the setting went.
        if self.trainer.state.fn == TrainerFn.FITTING:
            self._refuse_trainer_settings()
        return []

    def _refuse_trainer_settings(self) -> None:
        """Refuse the Trainer's clipping and accumulation, naming this module's arguments of the same names.

        Raises:
            ValueError: for a Trainer with ``gradient_clip_val`` > 0 or ``accumulate_grad_batches`` != 1.
        """
        trainer = self.trainer
        for name, value, unset in (("gradient_clip_val", trainer.gradient_clip_val, (None, 0)),
                                   ("accumulate_grad_batches", trainer.accumulate_grad_batches, (1,))):
            if value not in unset:
                also = " and `gradient_clip_algorithm`" if name == "gradient_clip_val" else ""
                raise ValueError(
                    f"`Trainer({name}={value})` does not apply to {type(self).__name__}, which optimizes manually; "
                    f"give `{name}`{also} to the module instead: {type(self).__name__}({name}={value}), or "
                    f"`model.init_args.{name}: {value}` in a LightningCLI config, and leave the Trainer's unset"
                )

    @property
    def estimated_optimizer_steps(self) -> int | float:
        """The optimizer steps of this fit: ``trainer.estimated_stepping_batches`` counted with this module's
        ``accumulate_grad_batches`` (the Trainer does not know it), a last partial window of an epoch included."""
        trainer = self.trainer
        estimate = trainer.estimated_stepping_batches  # loads the training data when needed
        batches = trainer.num_training_batches
        if self.accumulate_grad_batches == 1 or trainer.max_epochs == -1 or batches == float("inf"):
            return estimate  # counted in optimizer steps already: max_steps, or one step per batch
        steps = math.ceil(batches / self.accumulate_grad_batches) * max(trainer.max_epochs, 1)
        return steps if trainer.max_steps == -1 else min(steps, trainer.max_steps)

    def configure_model(self) -> None:
        if self.compile_model and not self._compiled:  # once: fit, validate and test share the compiled forward
            self.model.compile()
            self._compiled = True

    @override
    def on_fit_start(self) -> None:
        if self.selection_scope == "global" and any(isinstance(m, nn.SyncBatchNorm) for m in self.model.modules()):
            raise ValueError(
                "`selection_scope`='global' lets ranks backpropagate different numbers of rows, which breaks "
                "SyncBatchNorm's contract of equal per-rank batches; use `selection_scope`='local' or train "
                "without `sync_batchnorm`"
            )
        self._check_weight_averaging()
        self._check_training_batches()
        dashboard.describe_run(self.loggers, self.settings, self.eps_warmup_epochs)

    def _check_weight_averaging(self) -> None:
        """Refuse Lightning's ``StochasticWeightAveraging`` on a network with BatchNorm, before the first step.

        Its extra last epoch recomputes the BatchNorm statistics of the averaged weights by a pass whose backward
        Lightning skips, which only automatic optimization honours: here that epoch would train the averaged
        weights one more adversarial epoch. Without BatchNorm there is no such epoch, and it is allowed.

        Raises:
            ValueError: for a ``StochasticWeightAveraging`` callback and a network with BatchNorm layers.
        """
        swa = next((c for c in self.trainer.callbacks if isinstance(c, StochasticWeightAveraging)), None)
        if swa is not None and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules()):
            raise ValueError(
                f"`{type(swa).__name__}` recomputes BatchNorm statistics in an extra epoch whose backward only "
                f"automatic optimization skips; {type(self).__name__} optimizes manually, so that epoch would "
                "train the averaged weights further. Use `lightning.pytorch.callbacks.EMAWeightAveraging` (or "
                "`WeightAveraging`), which averages the BatchNorm statistics with the weights, or a network without "
                "BatchNorm"
            )

    def _check_training_batches(self) -> None:
        """Refuse, before the sanity check and the first step, a training loader that yields no batch.

        Lightning only warns and runs zero steps (a shuffled empty loader fails in ``RandomSampler``, an unshuffled
        one does not). ``estimated_stepping_batches`` loads the training loader, as Lightning documents for
        ``configure_optimizers``; on a resume it is left to Lightning's own order, because loading early would skip
        restoring a stateful loader's checkpointed position.

        Raises:
            ValueError: for a training loader of zero batches (an empty training set, or ``drop_last`` with fewer
                samples than ``batch_size``).
        """
        trainer = self.trainer
        if trainer.ckpt_path is not None or trainer.limit_train_batches == 0:
            return
        trainer.estimated_stepping_batches  # noqa: B018 - loads the training loader and counts its batches
        if trainer.num_training_batches == 0:
            raise ValueError(
                "the training data loader yields no batches (an empty training set, or `drop_last` with fewer "
                "samples than the batch size); check the data set and its split sizes"
            )

    def _log_train(self, out: StepResult, step_work: list[int]) -> None:
        r = out.record
        selected, y = r.selected, r.y[r.selected]
        if r.logits is None:  # no row of this rank passed the global threshold
            shown = out.loss.detach()
        elif out.k_global is None:
            shown = out.loss.detach()
        else:  # the scaled global loss is not a mean: show this rank's mean cross-entropy
            shown = F.cross_entropy(r.logits, y)
        # Accuracy over the pool: from the scoring pass when there was one; otherwise the trained rows are
        # the whole pool or a uniform sample of it.
        # update, not forward: only epoch values are logged, so no step value is computed.
        if out.pool_logits is not None:
            self.train_acc.update(out.pool_logits, r.y)
        elif selected.numel():
            self.train_acc.update(r.logits, y)
        if selected.numel():
            self.train_acc_selected.update(r.logits, y)
            self.train_adv_frac.update(r.is_adv[selected].float())
            self.train_clean_frac.update((~r.is_adv[selected]).float())
        n = r.batch_size
        self.train_attacked_frac.update(r.y.new_full((), r.attacked.numel() / n, dtype=torch.float), weight=n)
        # Every rank logs the same keys every step: the epoch-end sync of a metric is a collective.
        s = selected.numel()
        if s:
            self.train_loss(shown, weight=s)  # the step's value, and its share of the epoch's weighted mean
        else:  # no row selected on this rank (global scope): nothing to average; the step shows the last value
            self.train_loss.update(shown, weight=0)
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True)
        # The same on every rank: the epoch-end sync (one all-reduce per epoch) only keeps DDP's logging uniform.
        self.log("train/p_up", self._scalar(self.p_up), on_step=False, on_epoch=True, batch_size=s, sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc_selected", self.train_acc_selected, on_step=False, on_epoch=True)
        self.log("train/selected_adv_frac", self.train_adv_frac, on_step=False, on_epoch=True)
        self.log("train/selected_clean_frac", self.train_clean_frac, on_step=False, on_epoch=True)
        self.log("train/attacked_frac", self.train_attacked_frac, on_step=False, on_epoch=True)
        if r.attack_scores is not None:
            self._log_attack_scores(r.attack_scores, r.attacked)
        self._log_cost(out, r.batch_size, step_work)

    def _log_cost(self, out: StepResult, batch_rows: int, step_work: list[int]) -> None:
        """The step's work, already summed over ranks (``step_work``), logged per step; this rank's added to the
        run's totals (summed over ranks when they are computed).

        Steps dropped by ``nonfinite: skip`` are not counted.
        """
        self.work.update(out.cost, cost.robust_cost(self.settings, batch_rows))
        for tag, value in zip(dashboard.STEP_TAGS, step_work, strict=True):
            self.log(tag, self._scalar(value), on_step=True, on_epoch=False, batch_size=1)

    def _scalar(self, value: float) -> Tensor:
        """A number to log every step, made on the module's device by a kernel: ``self.log`` turns a Python
        number into a tensor by a copy from the host, which on a GPU waits for all the work queued before it."""
        return torch.full((), float(value), device=self.device)

    def _log_attack_scores(self, scores: Tensor, attacked: Tensor) -> None:
        """Epoch means of the pre-attack score (margin, cosine, ...) over the attacked and the other rows."""
        self.train_attack_score_selected.update(scores[attacked])
        self.log("train/attack_score_selected", self.train_attack_score_selected, on_step=False, on_epoch=True)
        others = scores.numel() - attacked.numel()  # attacked holds distinct rows
        if others:  # attack_frac = 1 leaves no unattacked rows
            # The other rows' indices without a boolean mask, which would make the host wait for the device.
            rest = torch.ones_like(scores, dtype=torch.uint8).index_fill_(0, attacked, 0)
            self.train_attack_score_unselected.update(scores[selection.mask_indices(rest, others)])
            self.log("train/attack_score_unselected", self.train_attack_score_unselected, on_step=False,
                     on_epoch=True)

    def _step_scheduler(self, interval: str) -> None:
        """Step the scheduler the Trainer holds if it runs every ``interval``: this module's (``scheduler_interval``)
        or the one ``Tuner.lr_find`` puts in its place for its search, which runs every step."""
        configs = self.trainer.lr_scheduler_configs
        if not configs or configs[0].interval != interval:
            return
        scheduler = configs[0].scheduler
        if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step()
            return
        # At the epoch's end, after its validation: the value every rank logged (synced), so all ranks agree.
        value = self.trainer.callback_metrics.get(scheduler.monitor)
        if value is None:
            raise ValueError(f"`lr_scheduler` ReduceLROnPlateau follows monitor={scheduler.monitor!r}, which this "
                             f"run does not log; logged: {sorted(self.trainer.callback_metrics)}")
        scheduler.step(float(value))

    @override
    def on_train_epoch_start(self) -> None:
        self._epoch_started = time.perf_counter()

    @override
    def on_train_epoch_end(self) -> None:
        self._step_scheduler("epoch")
        # Rank 0's progress bar has already synced the epoch's logged values; the other ranks sync them here,
        # before the counters' collective, so every rank makes the same collectives in the same order.
        distributed.settle_logged_values(self.trainer)
        # Totals already summed over ranks (the same on every rank), and each rank's clock, averaged over ranks.
        totals = self.work.compute()
        distributed.log_rank_wide(
            self, {tag: float(totals[name]) for tag, name in zip(dashboard.TOTAL_TAGS, cost.COUNTERS, strict=True)})
        self.log(dashboard.EPOCH_SECONDS, time.perf_counter() - self._epoch_started, on_step=False, on_epoch=True,
                 batch_size=1, sync_dist=True)
        # And these two syncs now too, on every rank: no rank-zero reader after this hook can start them alone.
        distributed.settle_logged_values(self.trainer)

    @override
    def on_train_end(self) -> None:
        self.work_totals = self.work.compute()  # a collective: every rank, before the rank-zero summary

    # Under DDP every rank evaluates with rank 0's BatchNorm statistics, those its checkpoints hold.
    @override
    def on_validation_start(self) -> None:
        distributed.broadcast_buffers(self.trainer.strategy, self.model)

    @override
    def on_test_start(self) -> None:
        distributed.broadcast_buffers(self.trainer.strategy, self.model)

    @override
    def on_predict_start(self) -> None:
        distributed.broadcast_buffers(self.trainer.strategy, self.model)

    def cost_summary(self) -> str | None:
        """The training cost of the last ``fit`` against robust training's (:func:`lightning_advsel.cost.summary`)."""
        return None if self.work_totals is None else cost.summary(self.work_totals)

    def accuracy_keys(self) -> list[str]:
        """The accuracies (values in [0, 1]) this module logs once per epoch, for callbacks that monitor one.

        With several validation loaders each ``val/`` key is logged per loader, ``/dataloader_idx_{i}`` appended.
        """
        keys = ["train/acc", "train/acc_selected", "val/acc_clean"]
        if self.eval_attack is not None and self.eval_attack.enabled:
            keys.append("val/acc_robust")
        return keys

    # ---------------------------------------------------------------------------------------------- evaluation
    def robust_attack(self, stage: str) -> AttackConfig | AutoAttackConfig | None:
        """The attack behind ``{stage}/acc_robust``: ``test_attack`` when testing (if set), else ``eval_attack``."""
        if stage == "test" and self.test_attack is not None:
            return self.test_attack
        return self.eval_attack

    def _new_eval_metrics(self) -> list[Metric]:
        """One evaluation loader's clean accuracy, robust accuracy and clean loss (``EVAL_KINDS``' order).

        The clean loss is a metric for the same reason as the training loss: its epoch value is the mean over every
        rank's rows. A non-finite loss stays in the mean (a diverged model shows NaN, not a mean of its finite
        rows); it is fed one value per row because this NaN strategy ignores weights (torchmetrics 1.9).
        """
        return [MulticlassAccuracy(self.num_classes, average="micro"),
                MulticlassAccuracy(self.num_classes, average="micro"), MeanMetric(nan_strategy="disable")]

    def _eval_metrics(self, stage: str, dataloader_idx: int) -> dict[str, tuple[str, Metric]]:
        """``{"acc_clean" | "acc_robust" | "loss_clean": (attribute name, metric)}`` of one ``stage`` dataloader.

        Each loader counts in its own metrics, so no loader's rows reach another's numbers and each is synced
        over DDP ranks on its own; the first loader's are the attributes ``{stage}_acc_clean``,
        ``{stage}_acc_robust`` and ``{stage}_loss_clean``.
        """
        if dataloader_idx == 0:
            return {kind: (f"{stage}_{kind}", getattr(self, f"{stage}_{kind}")) for kind in EVAL_KINDS}
        key = f"{stage}_dataloader_idx_{dataloader_idx}"
        if key not in self.eval_metrics:
            self.eval_metrics[key] = nn.ModuleList(self._new_eval_metrics()).to(self.device)
        return {kind: (f"eval_metrics.{key}.{i}", metric)
                for i, (kind, metric) in enumerate(zip(EVAL_KINDS, self.eval_metrics[key], strict=True))}

    def _eval_step(self, batch: Any, batch_idx: int, stage: str, dataloader_idx: int = 0) -> None:
        x, y, _ = self.read_batch(batch)
        metrics = self._eval_metrics(stage, dataloader_idx)
        model = self.pixel_model
        self._check_model_output(x)
        attack = self.robust_attack(stage)
        attacks = attack is not None and attack.enabled
        y = self._check_eval_batch(x, y, batch_idx, stage, attack if attacks else None)
        logits = model(x)
        (loss_name, loss_clean), (clean_name, acc_clean) = metrics["loss_clean"], metrics["acc_clean"]
        loss_clean(F.cross_entropy(logits, y, reduction="none"))  # per row: the epoch's value is their mean
        acc_clean(logits, y)
        # With several loaders Lightning appends "/dataloader_idx_{i}" to each key (`add_dataloader_idx`).
        self.log(f"{stage}/loss_clean", loss_clean, metric_attribute=loss_name)
        self.log(f"{stage}/acc_clean", acc_clean, prog_bar=True, metric_attribute=clean_name)
        if attacks:
            name, acc_robust = metrics["acc_robust"]
            acc_robust(self._attacked_logits(attack, x, y, batch_idx, checked=True), y)
            self.log(f"{stage}/acc_robust", acc_robust, prog_bar=True, metric_attribute=name)

    def _check_eval_batch(self, x: Tensor, y: Tensor, batch_idx: int, stage: str,
                          attack: AttackConfig | AutoAttackConfig | None) -> Tensor:
        """The batch's labels as int64 class indices, checked in range on every rank; with an ``attack``, its
        inputs finite on every rank (both in one agreement) and, once per process and stage, pixels in [0, 1]
        (:meth:`AttackConfig.check_batch`), so that the attack then runs without its per-batch checks."""
        y = self._labels(y, batch_idx)
        mine, anyone = self._agree_on_inputs(x, y)
        self._refuse_labels(y, batch_idx, mine[1], anyone[1])
        if attack is None:
            return y
        if anyone[0]:  # every rank raises, before any rank attacks
            raise ValueError(f"{stage} batch {batch_idx} holds NaN or inf inputs{'' if mine[0] else ' on another rank'}"
                             f"; the {stage} attack needs finite pixels in [0, 1]")
        if isinstance(attack, AttackConfig):  # AutoAttack checks its own inputs
            self._check_attack_batch(stage, attack, x, y)
        return y

    def _attacked_logits(self, attack: AttackConfig | AutoAttackConfig, x: Tensor, y: Tensor, batch_idx: int,
                         checked: bool = False) -> Tensor:
        """The model's logits on ``attack``'s examples of ``(x, y)``, seeded by the batch index alone: the same
        weights give the same adversarial examples every time. ``checked``: the batch was checked
        (:meth:`_check_eval_batch`), so a PGD attack skips its own checks (same examples, no host waits)."""
        model = self.pixel_model  # built on each access: once here
        if isinstance(attack, AutoAttackConfig):
            x_adv = attack(model, x, y, batch_idx=batch_idx, num_classes=self.num_classes)
        else:
            run = attack.unchecked if checked else attack
            x_adv = run(model, x, y, generator=self._generator(x.device, -(batch_idx + 1)))
        with torch.no_grad():
            return model(x_adv)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, "val", dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, "test", dataloader_idx)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """The model's logits and predicted classes for one batch; with ``predict_attack``, also under attack.

        A batch is read as in training (:mod:`lightning_advsel.batch`), or holds inputs alone (``x``, ``(x,)``,
        or a mapping without the label key of ``batch_keys``). The attack needs
        labels: it attacks ``y`` when the batch has labels, else the model's own clean predictions. The examples
        are seeded by the batch index as in ``test``, so with ``predict_attack`` equal to ``test_attack`` the
        adversarial predictions are exactly those behind ``test/acc_robust``.

        Returns:
            ``{"logits": (B, num_classes), "pred": (B,)}`` (``pred`` the argmax class), and with ``predict_attack``
            also ``"logits_adv"`` and ``"pred_adv"``.

        Raises:
            ValueError: for a batch that holds no input tensor, or labels outside ``[0, num_classes)``.
        """
        x, y = inputs_and_labels(batch, self.batch_keys)
        x = self.to_pixels(x)
        logits = self.pixel_model(x)
        out = {"logits": logits, "pred": logits.argmax(dim=1)}
        attack = self.predict_attack
        if attack is not None and attack.enabled:
            y = out["pred"] if y is None else self._check_batch(y, batch_idx)
            out["logits_adv"] = self._attacked_logits(attack, x, y, batch_idx)
            out["pred_adv"] = out["logits_adv"].argmax(dim=1)
        return out

    # ------------------------------------------------------------------------------------------- optimization
    @property
    def lr(self) -> float:
        """The learning rate the optimizer starts from: the one set here, else the ``optimizer`` factory's.

        ``Tuner(trainer).lr_find(module, datamodule=dm)`` sets it to its suggestion, and the next ``fit`` builds
        the optimizer with it (before the scheduler reads its base rate). A checkpoint keeps it, so a resumed run
        and ``load_from_checkpoint`` go on with it; a module built anew from its config does not: put the value in
        the config (``model.init_args.optimizer.init_args.lr``).

        Raises:
            ValueError: when set to anything but a finite number > 0.
        """
        if self._lr is not None:
            return self._lr
        return float(self.optimizer_factory([nn.Parameter(torch.zeros(1))]).param_groups[0]["lr"])

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = checks.check_number("lr", value, 0.0, strict=True)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.model.parameters())
        if self._lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = self._lr
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self._check_plateau(scheduler)
        if isinstance(scheduler, schedules.RunLengthSchedule):
            scheduler.set_length(self._schedule_length())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}

    def _check_plateau(self, scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau) -> None:
        """Check that a ``ReduceLROnPlateau`` names the metric it follows (``monitor``, which Lightning's CLI
        subclass has) and that this fit logs it at the end of each epoch.

        Raises:
            ValueError: for torch's class (no ``monitor``), a ``scheduler_interval`` other than ``"epoch"``, or a
                validation metric when this fit runs no validation (``limit_val_batches`` 0).
        """
        monitor = getattr(scheduler, "monitor", None)
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(
                f"`lr_scheduler` {type(scheduler).__name__} needs the metric it follows, got monitor={monitor!r}: use "
                "lightning.pytorch.cli.ReduceLROnPlateau with `monitor`, e.g. monitor='val/acc_robust', mode='max'"
            )
        if self.scheduler_interval != "epoch":
            raise ValueError(f"`scheduler_interval` must be 'epoch' for ReduceLROnPlateau (it follows an epoch's "
                             f"metric), got {self.scheduler_interval!r}")
        if monitor.startswith("val/") and self._trainer is not None and self._trainer.limit_val_batches == 0:
            raise ValueError(f"`lr_scheduler` ReduceLROnPlateau follows monitor={monitor!r}, but this fit runs no "
                             "validation (`limit_val_batches` is 0)")

    def _schedule_length(self) -> int:
        """The ``step()`` calls of this fit's scheduler: optimizer steps, or epochs (``scheduler_interval``).

        Raises:
            ValueError: for a run without an end (no ``max_epochs`` or ``max_steps``, or an endless data set).
        """
        steps = self.estimated_optimizer_steps
        batches = self.trainer.num_training_batches
        if steps == float("inf") or (self.scheduler_interval == "epoch" and batches == float("inf")):
            raise ValueError("a schedule of lightning_advsel.schedules spans the whole run, but this run has no end: "
                             "set the Trainer's `max_steps` or `max_epochs`")
        if self.scheduler_interval == "step":
            return int(steps)
        per_epoch = math.ceil(batches / self.accumulate_grad_batches)
        return math.ceil(steps / per_epoch)

    # ---------------------------------------------------------------------------------------------- checkpoint
    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> AdversarialSelectionModule:
        """Lightning's ``load_from_checkpoint``, refusing a damaged file by name before torch reads it.

        Arguments are Lightning's; a module built from Python reloads with ``load_from_checkpoint(path, model=Net())``.

        Raises:
            ValueError: naming the file, for a ``checkpoint_path`` that is truncated or not written by ``torch.save``
                (:func:`~lightning_advsel.checks.check_checkpoint_file`); for a checkpoint of another model
                architecture.
        """
        check_checkpoint_file(checkpoint_path, "checkpoint_path")
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        distributed.settle_logged_values(self.trainer)  # before the collectives of the counters and the window
        checkpoint["advsel"] = {"p_up": self.p_up, "skipped_steps": self.skipped_steps, "lr": self._lr,
                                "train_metrics": self._train_metric_states(),
                                "work": self._work_so_far(),
                                "accumulation": self._window_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_architecture(checkpoint.get("state_dict", {}))
        state = checkpoint.get("advsel", {})
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if state.get("lr") is not None:  # a learning rate set on the module (`lr`); None: the factory's
            self.lr = state["lr"]
        self._load_train_metric_states(state.get("train_metrics", {}))
        self._load_window_state(state.get("accumulation", {}), int(checkpoint.get("global_step", 0)))
        # Summed over ranks when saved: rank 0 continues from them, so the sum stays right for any world size.
        self.work.restore(state.get("work", {}), holds_totals=self.global_rank == 0)
        p_up = state.get("p_up", self.p_up)
        if not (isinstance(p_up, float) and math.isfinite(p_up) and 0 < p_up <= 1):
            rank_zero_warn(f"checkpoint holds an invalid p_up={p_up!r}; keeping p_up={self.p_up}")
            return
        self.p_up = p_up

    # The epoch accumulators of the selection statistics, so a run resumed mid-epoch logs the same epoch values.
    _TRAIN_METRICS = ("train_acc", "train_acc_selected", "train_adv_frac", "train_clean_frac", "train_attacked_frac")

    def _window_state(self) -> dict[str, Any]:
        """The accumulation window in progress: a checkpoint taken inside one holds its gradients, so a resumed run
        steps exactly as an uninterrupted one (under DDP the gradients are already averaged over ranks)."""
        grads = None
        if self._window_batches > 0 and self._window_has_grads:
            self._sync_window_grads()  # every rank saves (Lightning's contract), so every rank takes part
            grads = [None if p.grad is None else p.grad.detach().cpu().clone() for p in self.model.parameters()]
        return {"batches_trained": self.batches_trained, "window_batches": self._window_batches, "grads": grads}

    def _load_window_state(self, state: dict[str, Any], global_step: int) -> None:
        # A checkpoint from before accumulation existed was taken at a step's end: one batch per step.
        self.batches_trained = int(state.get("batches_trained", global_step))
        self._window_batches = int(state.get("window_batches", 0))
        self._restored_grads = state.get("grads")
        self._window_has_grads = self._restored_grads is not None

    def _work_so_far(self) -> dict[str, int]:
        """The run's work totals, summed over ranks: every rank saves a checkpoint (Lightning's contract)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*compute.*before.*update", category=UserWarning)
            return self.work.compute()

    def _train_metric_states(self) -> dict[str, dict[str, Tensor]]:
        return {name: {key: value.detach().cpu().clone() for key, value in getattr(self, name).metric_state.items()
                       if isinstance(value, Tensor)}
                for name in self._TRAIN_METRICS}

    def _load_train_metric_states(self, states: dict[str, dict[str, Tensor]]) -> None:
        for name, metric_states in states.items():
            metric = getattr(self, name, None)
            if metric is None or set(metric_states) != set(metric.metric_state):
                continue
            # Every state of these metrics is a sum, so merging into reset states gives the saved values exactly.
            metric.reset()
            metric.merge_state({key: value.to(metric.device) for key, value in metric_states.items()})

    def _check_architecture(self, saved: dict[str, Tensor]) -> None:
        """Refuse a checkpoint whose ``model`` weights do not fit this module's ``model``.

        Raises:
            ValueError: naming the missing and unexpected keys and the shape mismatches.
        """
        own = {k: v for k, v in self.state_dict().items() if k.startswith("model.")}
        theirs = {k: v for k, v in saved.items() if k.startswith("model.")}
        if not theirs:
            return
        missing = sorted(set(own) - set(theirs))
        unexpected = sorted(set(theirs) - set(own))
        shapes = [f"{k}: checkpoint {tuple(theirs[k].shape)}, model {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(theirs)) if tuple(own[k].shape) != tuple(theirs[k].shape)]
        if missing or unexpected or shapes:
            def head(items: list[str]) -> str:
                return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
            raise ValueError(
                f"the checkpoint was written for a different model architecture than `model` "
                f"({type(self.model).__name__}): missing keys [{head(missing)}], unexpected keys "
                f"[{head(unexpected)}], shape mismatches [{head(shapes)}]; build the module with the model "
                f"the checkpoint was trained with"
            )
