"""The LightningModule around the training step: thin Lightning hooks over the policies it holds.

What a training step does (attack, pool, selection, loss over the selected rows) is the functional core in
:mod:`lightning_advsel.step`; :class:`AdversarialSelectionModule` calls :func:`~lightning_advsel.step.adversarial_step`
once per batch and hands everything around it to small objects, each in a file named for its policy:

* :class:`~lightning_advsel.guards.BatchGuards`: the batch checks agreed across ranks and the non-finite policy;
* :class:`~lightning_advsel.accumulation.AccumulationWindow`: backward passes, clipping and optimizer steps;
* :class:`~lightning_advsel.optimization.Optimization`: the optimizer, the scheduler and ``lr``;
* :class:`~lightning_advsel.metric_groups.MetricGroups`: the training and evaluation metrics and their logs;
* :class:`~lightning_advsel.batch_schedule.Warmup`: the step settings of each batch under the warm-ups;
* :class:`~lightning_advsel.attack_compilation.AttackCompilation`: the compiled attacks of ``compile_attack``;
* :mod:`~lightning_advsel.fit_checks`: what is refused before the first step.

The callbacks read the module through :class:`~lightning_advsel.step.SelectionModule` (``model``, ``num_classes``,
``settings``, ``p_up``, ``last_selection``), which a user's own module can provide as well.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_advsel import checks, cost, dashboard, distributed, fit_checks, selection
from lightning_advsel.accumulation import AccumulationWindow, ClipAlgorithm
from lightning_advsel.attack_compilation import AttackCompilation
from lightning_advsel.attacks import AttackConfig, Mode
from lightning_advsel.batch import check_keys, index_in
from lightning_advsel.batch_schedule import Warmup, WarmupPick, seeded_generator
from lightning_advsel.checks import check_checkpoint_file
from lightning_advsel.compiled_attack import CompiledPGD
from lightning_advsel.eval_attacks import AUTO, Auto, as_attack, as_robust_attack, attacked_logits, resolve_eval_attack
from lightning_advsel.evaluation import AutoAttackConfig
from lightning_advsel.guards import BatchGuards, Nonfinite, agree
from lightning_advsel.hyperparameters import save_plain_hyperparameters
from lightning_advsel.metric_groups import MetricGroups, scalar
from lightning_advsel.objectives import Objective, ObjectiveName
from lightning_advsel.optimization import Interval, Optimization, step_scheduler
from lightning_advsel.pixels import as_normalization, pixel_model, read_pixel_inputs, read_pixels, to_pixels
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


class _Held:
    """An attribute of the module that one of its policy objects holds (read-only unless ``writable``)."""

    def __init__(self, holder: str, name: str, writable: bool = False) -> None:
        self.holder, self.name, self.writable = holder, name, writable

    def __set_name__(self, owner: type, attribute: str) -> None:
        self.attribute = attribute

    def __get__(self, module: Any, owner: type | None = None) -> Any:
        return self if module is None else getattr(getattr(module, self.holder), self.name)

    def __set__(self, module: Any, value: Any) -> None:
        if not self.writable:
            raise AttributeError(f"`{self.attribute}` is set when the module is built, not after")
        setattr(getattr(module, self.holder), self.name, value)


class AdversarialSelectionModule(L.LightningModule):
    """Adversarial training with data selection around any ``nn.Module`` classifier.

    The classifier takes pixels in [0, 1] (normalization is inside it, or see ``input_normalization``) and returns
    logits ``(B, num_classes)``. Optimization is manual: the module runs the attack, the selection, the backward
    pass over the selected rows and the optimizer and scheduler steps. With several validation (or test) loaders
    each logs under Lightning's ``dataloader_idx`` keys (``val/acc_clean/dataloader_idx_1``); with one,
    ``val/acc_clean`` and ``val/acc_robust``.

    ``recipe``, ``p_up``, ``attack_frac``, ``attack_score``, ``train_attack``, ``scoring_mode``, ``attack_sampling``,
    ``clean_weight``, ``selection_forward`` and ``clean_rows`` are the fields of
    :class:`~lightning_advsel.step.StepSettings` (``module.settings``), documented there; ``objective``,
    ``objective_weight`` and ``label_smoothing`` build its :class:`~lightning_advsel.objectives.Objective`.

    Args:
        model: the classifier to train.
        recipe: ``"standard"``, ``"robust"`` (Madry PGD-AT), ``"ds"``, ``"random"``, ``"selective"`` or
            ``"selective_ds"``.
        p_up: fraction of the pool backpropagated, in (0, 1]; callbacks may change it per epoch. ``None``: the
            recipe's :func:`default_p_up` (0.5 where the pool appends the adversarial rows, else 1.0).
        attack_frac: fraction of the clean batch attacked by the selective recipes, in (0, 1].
        attack_score: pre-attack score of the selective recipes (:data:`~lightning_advsel.selection.PRE_ATTACK_SCORES`).
        train_attack: the attack that makes training examples; default PGD-10, L-inf eps 0.1, alpha 0.025, ``"train"``
            mode (batch statistics, BatchNorm running statistics frozen).
        eval_attack: the attack for ``val/acc_robust``. ``"auto"`` (default): PGD-20 at the training attack's ``eps``
            and ``norm``, alpha 0.01, ``"eval"`` mode. ``None``: no robust evaluation.
        test_attack: the attack for ``test/acc_robust``, an ``AttackConfig`` or an
            :class:`~lightning_advsel.evaluation.AutoAttackConfig`; ``None`` (default): ``eval_attack``.
        num_classes: classes of the task.
        optimizer: optimizer factory, called with the model parameters; its learning rate is :attr:`lr` if set.
        lr_scheduler: optional scheduler factory, called with the optimizer. A ``ReduceLROnPlateau`` follows its
            ``monitor`` (``lightning.pytorch.cli.ReduceLROnPlateau``), stepped at each training epoch's end.
        scheduler_interval: step the scheduler every ``"epoch"`` or every ``"step"``.
        scoring_mode: model mode of the no-grad scoring passes (see :func:`~lightning_advsel.attacks.model_mode`).
        seed: seed of the per-step random generator (PGD starts, random picks), reseeded from ``(seed, step, rank)``
            each step, so a resumed run draws the same.
        selection_scope: under DDP, ``"local"`` (each rank's top ``p_up``) or ``"global"`` (the top ``p_up`` of
            the global pool, see :mod:`lightning_advsel.distributed`; SyncBatchNorm is then refused).
        nonfinite: a NaN or inf in an input batch or the training loss: ``"raise"`` an error naming the step, or
            ``"skip"`` the step on every rank, counted in ``skipped_steps`` and logged as ``train/skipped_steps``.
        objective: ``"ce"``, ``"trades"`` or ``"mart"`` (:mod:`lightning_advsel.objectives`).
        objective_weight: ``beta`` of TRADES (default 6) or ``lambda`` of MART (default 5); ``None`` for ``"ce"``.
        label_smoothing: label smoothing of the ``"ce"`` objective's training loss, in [0, 1).
        attack_sampling: ``"top"`` or ``"proportional"``.
        clean_weight: weight of the clean rows' loss among the backpropagated rows; 1 is the plain mean.
        attack_warmup_epochs: epochs at the start in which the selective recipes attack every row; 0: none.
        selection_forward: ``"separate"`` (default) or ``"shared"``.
        clean_rows: ``"unattacked"`` (default) or ``"all"``.
        attack_warmup: what the selective recipes attack during ``attack_warmup_epochs``: ``"all"`` or ``"random"``
            (a random ``attack_frac``, as the selective authors' script does).
        batch_keys: ``(input key, label key)`` of mapping batches (:mod:`lightning_advsel.batch`); an ``"index"``
            entry becomes ``last_selection.index``. Sequence batches ``(x, y, *extra)`` are read by position.
        input_normalization: ``(mean, std)`` per channel, pixel units, when the data module yields normalized inputs
            and ``model`` expects them: every step attacks pixels (:mod:`lightning_advsel.pixels`), so every ``eps``
            stays in pixel units. ``None`` (default): inputs are pixels in [0, 1].
        gradient_clip_val: clip the gradients before each optimizer step at this value (``None`` or 0: none).
        gradient_clip_algorithm: ``"norm"`` (the total norm) or ``"value"`` (each element).
        accumulate_grad_batches: step the optimizer every this many batches (:mod:`lightning_advsel.accumulation`).
            These three are the Trainer's arguments, which Lightning refuses under manual optimization.
        predict_attack: the attack behind ``predict``'s adversarial predictions, of the kinds of ``test_attack``;
            ``None`` (default): clean predictions only.
        channels_last: store the model's 4-D weights channels-last (NHWC, which GPU tensor cores prefer); it
            changes the order of floating-point sums, so numbers differ slightly. Off by default.
        compile_model: compile the model's forward (``nn.Module.compile``: state dict keys unchanged). Off by default.
        eps_warmup_epochs: epochs over which the training attack's ``eps`` and ``alpha`` rise linearly, batch by
            batch (:class:`~lightning_advsel.batch_schedule.Warmup`), logged as ``train/eps``; 0: none.
        compile_attack: run the PGD attacks (training, and the PGD of validation, test and prediction) as one
            compiled graph each (:class:`~lightning_advsel.compiled_attack.CompiledPGD`; on CUDA replayed as CUDA
            graphs), compiled once per attacked row count of the run; the same examples from the same draws as the
            eager attack, up to the order of floating-point sums. Fit start prints one line saying what compiles
            or why the attack stays eager (SyncBatchNorm, a BatchNorm with a forward of its own, mode ``"keep"``
            on a training BatchNorm); scoring, selection and the training forward stay eager, and AutoAttack is
            untouched. With ``compile_model`` as well, those eager parts run the compiled forward, while the
            attack's graph traces the model's forward into its own. Needs torch >= 2.11. Off by default.

    Raises:
        ValueError: for an argument out of its range or of the wrong type (the message names it), a ``model``
            that is not an ``nn.Module``, ``attack_score="gradmatch"`` on a model without an ``nn.Linear`` head;
            at fit start, what :mod:`lightning_advsel.fit_checks` refuses; at a batch, what
            :mod:`lightning_advsel.guards` refuses; when loading a checkpoint of another model architecture.
        ImportError: for an AutoAttack ``test_attack`` whose package is not installed (naming the pip command).
        RuntimeError: with ``compile_attack``, for a torch release older than the compiled attack needs.
    """

    nonfinite = _Held("guards", "nonfinite")
    skipped_steps = _Held("guards", "skipped_steps")
    accumulate_grad_batches = _Held("window", "batches")
    gradient_clip_val = _Held("window", "clip_val")
    gradient_clip_algorithm = _Held("window", "clip_algorithm")
    batches_trained = _Held("window", "batches_trained")
    optimizer_factory = _Held("optimization", "optimizer_factory")
    lr_scheduler_factory = _Held("optimization", "lr_scheduler_factory")
    scheduler_interval = _Held("optimization", "interval")
    attack_warmup = _Held("warmup", "attack_pick")
    attack_warmup_epochs = _Held("warmup", "attack_epochs")
    eps_warmup_epochs = _Held("warmup", "eps_epochs")
    compile_attack = _Held("attack_compilation", "enabled")

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
        compile_attack: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model` must be an nn.Module classifier, got {type(model).__name__}")
        checks.check_choice("recipe", recipe, RECIPES)
        self.settings = StepSettings(
            recipe=recipe, p_up=default_p_up(recipe) if p_up is None else p_up, attack_frac=attack_frac,
            attack_score=attack_score, scoring_mode=scoring_mode,
            train_attack=as_attack("train_attack", train_attack) or AttackConfig(mode="train"),
            objective=Objective(objective, objective_weight, label_smoothing), attack_sampling=attack_sampling,
            clean_weight=clean_weight, selection_forward=selection_forward, clean_rows=clean_rows)
        self.warmup = Warmup(attack_warmup_epochs, attack_warmup, eps_warmup_epochs)
        if clean_rows == "all" and selection_scope == "global":
            raise ValueError("`clean_rows`='all' takes the mean of each part on each rank; it has no global form, "
                             "use `selection_scope`='local'")
        self.batch_keys = check_keys(batch_keys)
        normalize = as_normalization(input_normalization)
        self.channels_last = checks.check_bool("channels_last", channels_last)
        self.compile_model = checks.check_bool("compile_model", compile_model)
        self.attack_compilation = AttackCompilation(compile_attack)
        if selection.PRE_ATTACK_SCORES[attack_score].needs_features:
            selection.last_linear(model, who=f"`attack_score`={attack_score!r}")
        self.num_classes = checks.check_int("num_classes", num_classes, 2)
        self.seed = checks.check_int("seed", seed, 0)
        self.selection_scope = checks.check_choice("selection_scope", selection_scope, distributed.SCOPES)
        self.guards = BatchGuards(num_classes, nonfinite)
        self.optimization = Optimization(optimizer, lr_scheduler, scheduler_interval)
        self.window = AccumulationWindow(accumulate_grad_batches, gradient_clip_val, gradient_clip_algorithm)
        # Resolved before the hyperparameters are saved: a checkpoint holds the attack itself.
        eval_attack = resolve_eval_attack(eval_attack, self.settings.train_attack)
        self.eval_attack = eval_attack
        self.test_attack = as_robust_attack("test_attack", test_attack)
        self.predict_attack = as_robust_attack("predict_attack", predict_attack)
        save_plain_hyperparameters(self, inspect.currentframe())

        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.input_normalization = normalize
        self._compiled = False
        self.automatic_optimization = False
        self.last_selection: SelectionRecord | None = None
        self.metric_groups = MetricGroups(num_classes, "metric_groups")
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

    # The optimizer's starting learning rate (Optimization.lr): `Tuner(trainer).lr_find` sets it, checkpoints keep it.
    lr = _Held("optimization", "lr", writable=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    @property
    def pixel_model(self) -> nn.Module:
        """The classifier on pixels in [0, 1], which every attack sees: ``model``, after ``input_normalization``.

        Built once and kept while ``model`` and ``input_normalization`` are the same objects: the compiled attack
        keeps a model's parameter dicts by the model object, so a wrapper built on every access would make them
        again every step. Kept out of the module's children, so the state dict's keys stay those of ``model``.
        """
        cached = self.__dict__.get("_pixel_model")
        if cached is None or cached[0] is not self.model or cached[1] is not self.input_normalization:
            cached = (self.model, self.input_normalization, pixel_model(self.model, self.input_normalization))
            self.__dict__["_pixel_model"] = cached  # past nn.Module.__setattr__, which would register it
        return cached[2]

    def to_pixels(self, x: Tensor) -> Tensor:
        """A batch's inputs as pixels: unchanged, or mapped back from ``input_normalization``."""
        return to_pixels(x, self.input_normalization)

    def read_batch(self, batch: Any) -> tuple[Tensor, Tensor, tuple[Any, ...] | dict[str, Any]]:
        """``(x, y, extra)`` of a batch (:func:`~lightning_advsel.batch.unpack` with ``batch_keys``), in pixels."""
        return read_pixels(batch, self.batch_keys, self.input_normalization)

    def _generator(self, device: torch.device, offset: int) -> torch.Generator:
        return seeded_generator(self.seed, offset, self.global_rank, device)

    # ----------------------------------------------------------------------------------------------- training
    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        """Check one batch, attack, select and backpropagate it (:func:`~lightning_advsel.step.adversarial_step`),
        and let the accumulation window step the optimizer. ``None`` for a batch that ``nonfinite="skip"`` dropped."""
        x, y, extra = self.read_batch(batch)
        model, trainer, out = self.pixel_model, self.trainer, None
        y = self.guards.check_batch(trainer.strategy, model, x, y, batch_idx, "train",
                                    self.settings.train_attack if self.settings.attacks else None,
                                    global_step=self.global_step, log=self.log)
        if y is not None:
            settings = self.warmup.settings(self.settings, self.current_epoch, batch_idx, trainer.num_training_batches)
            if self.warmup.eps_epochs:
                self.log("train/eps", scalar(settings.train_attack.eps, self.device), on_step=True, on_epoch=False)
            generator = self._generator(x.device, self.window.seed_offset(self.global_step))
            scope = GlobalScope(trainer.strategy) if self.selection_scope == "global" else LOCAL
            out = adversarial_step(model, x, y, settings, generator, scope, attacker=self.attack_compilation.train)
            # One all-reduce decides the finite-loss policy and sums the step's work over ranks for the cost log.
            mine, anyone, step_work = agree(trainer.strategy, ~torch.isfinite(out.loss).reshape(1),
                                            [getattr(out.cost, name) for name in cost.COUNTERS])
            if self.guards.skips(mine[0], anyone[0], "loss", batch_idx, self.global_step, self.log, out.loss):
                out = None
            else:
                self.window.backward(self, out.loss)
        if self.window.end_batch(self):
            step_scheduler(trainer, "step")
        if out is None:
            return None
        self.last_selection = replace(out.record, index=index_in(extra))
        self._log_train(out, step_work)
        return out.loss.detach()

    def _log_train(self, out: StepResult, step_work: list[int]) -> None:
        """Log a trained step: the training metrics, and its work (``step_work``, already summed over ranks, in
        :data:`lightning_advsel.cost.COUNTERS` order). This rank's work joins the run's totals."""
        self.metric_groups.train_group.log_step(out, self.log, scalar(self.p_up, self.device))
        self.work.update(out.cost, cost.robust_cost(self.settings, out.record.batch_size))
        for tag, value in zip(dashboard.STEP_TAGS, step_work, strict=True):
            self.log(tag, scalar(value, self.device), on_step=True, on_epoch=False, batch_size=1)

    @override
    def on_train_start(self) -> None:
        self.window.restore_grads(self.model)  # a checkpoint's window, now that the model is on its device
        # Here, not at fit start: the training loader, whose batch sizes bound the compiled graphs, is loaded now.
        plan = self.attack_compilation.plan(self.settings, self.warmup, self.selection_scope, self.pixel_model,
                                            self.trainer.train_dataloader, self.device)
        if plan is not None:
            rank_zero_info(plan)

    @override
    def on_train_epoch_start(self) -> None:
        self._epoch_started = time.perf_counter()

    @override
    def on_train_epoch_end(self) -> None:
        step_scheduler(self.trainer, "epoch")
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

    def cost_summary(self) -> str | None:
        """The training cost of the last ``fit`` against robust training's (:func:`lightning_advsel.cost.summary`)."""
        return None if self.work_totals is None else cost.summary(self.work_totals)

    def accuracy_keys(self) -> list[str]:
        """The accuracies (in [0, 1]) logged once per epoch, for callbacks that monitor one (with several
        validation loaders, each ``val/`` key per loader, ``/dataloader_idx_{i}`` appended)."""
        keys = ["train/acc", "train/acc_selected", "val/acc_clean"]
        if self.eval_attack is not None and self.eval_attack.enabled:
            keys.append("val/acc_robust")
        return keys

    # ------------------------------------------------------------------------------------------ fit and setup
    @override
    def configure_callbacks(self) -> list[L.Callback]:
        # Lightning checks the Trainer against manual optimization right after this hook, with a message that
        # names the Trainer's arguments only: refused here first, naming this module's arguments.
        if self.trainer.state.fn == TrainerFn.FITTING:
            fit_checks.refuse_trainer_settings(self.trainer, type(self).__name__)
        return []

    @override
    def configure_model(self) -> None:
        if self.compile_model and not self._compiled:  # once: fit, validate and test share the compiled forward
            self.model.compile()
            self._compiled = True

    @override
    def on_fit_start(self) -> None:
        fit_checks.refuse_sync_batchnorm(self.selection_scope, self.model)
        fit_checks.refuse_weight_averaging(self.trainer, self.model, type(self).__name__)
        fit_checks.refuse_empty_training(self.trainer)
        dashboard.describe_run(self.loggers, self.settings, self.warmup.eps_epochs)

    @override
    def configure_optimizers(self) -> Any:
        return self.optimization.configure(self.model.parameters(), self._trainer,
                                           lambda: self.estimated_optimizer_steps, self.window.batches)

    @property
    def estimated_optimizer_steps(self) -> int | float:
        """The optimizer steps of this fit: ``trainer.estimated_stepping_batches`` counted with this module's
        ``accumulate_grad_batches`` (the Trainer does not know it), a last partial window of an epoch included."""
        return self.window.optimizer_steps(self.trainer)

    # ---------------------------------------------------------------------------------------------- evaluation
    def robust_attack(self, stage: str) -> AttackConfig | AutoAttackConfig | None:
        """The attack behind ``{stage}/acc_robust``: ``test_attack`` when testing (if set), else ``eval_attack``."""
        if stage == "test" and self.test_attack is not None:
            return self.test_attack
        return self.eval_attack

    def _eval_step(self, batch: Any, batch_idx: int, stage: str, dataloader_idx: int) -> None:
        """Log one batch's clean loss and accuracy and, with the stage's attack, its robust accuracy, in the
        loader's own metric group."""
        x, y, _ = self.read_batch(batch)
        metrics = self.metric_groups.eval_group(stage, dataloader_idx, self.device)
        model, attack = self.pixel_model, self.robust_attack(stage)
        attack = attack if attack is not None and attack.enabled else None
        y = self.guards.check_batch(self.trainer.strategy, model, x, y, batch_idx, stage, attack)
        metrics.log_clean(self.log, stage, model(x), y)
        if attack is not None:
            generator = self._generator(x.device, -(batch_idx + 1))
            metrics.log_robust(self.log, stage, attacked_logits(model, attack, x, y, batch_idx, generator,
                                                                self.num_classes, self._eval_attacker(x)), y)

    def _eval_attacker(self, x: Tensor) -> CompiledPGD | None:
        return self.attack_compilation.evaluation(x.device)

    @override
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, "val", dataloader_idx)

    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, "test", dataloader_idx)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """The model's logits and predicted classes for one batch; with ``predict_attack``, also under attack.

        A batch is read as in training, or holds inputs alone. The attack targets the labels when there are any,
        else the clean predictions, seeded by the batch index as in ``test``: with ``predict_attack`` equal to
        ``test_attack`` the adversarial predictions are those behind ``test/acc_robust``.

        Returns:
            ``{"logits": (B, num_classes), "pred": (B,)}``; with ``predict_attack`` ``"logits_adv"``, ``"pred_adv"``.

        Raises:
            ValueError: for a batch without an input tensor; with an attack, as the checks of evaluation.
        """
        x, y = read_pixel_inputs(batch, self.batch_keys, self.input_normalization)
        model, attack = self.pixel_model, self.predict_attack
        logits = model(x)
        out = {"logits": logits, "pred": logits.argmax(dim=1)}
        if attack is not None and attack.enabled:
            y = self.guards.check_batch(self.trainer.strategy, model, x, out["pred"] if y is None else y, batch_idx,
                                        "predict", attack)
            generator = self._generator(x.device, -(batch_idx + 1))
            out["logits_adv"] = attacked_logits(model, attack, x, y, batch_idx, generator, self.num_classes,
                                                self._eval_attacker(x))
            out["pred_adv"] = out["logits_adv"].argmax(dim=1)
        return out

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

    # ---------------------------------------------------------------------------------------------- checkpoint
    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> AdversarialSelectionModule:
        """Lightning's ``load_from_checkpoint`` (from Python: ``load_from_checkpoint(path, model=Net())``).

        Raises:
            ValueError: naming the file, for a truncated file or one not written by ``torch.save``; for a checkpoint
                of another model architecture.
        """
        check_checkpoint_file(checkpoint_path, "checkpoint_path")
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        distributed.settle_logged_values(self.trainer)  # before the collectives of the counters and the window
        with warnings.catch_warnings():  # a checkpoint before the first step computes counters never updated
            warnings.filterwarnings("ignore", message=r".*compute.*before.*update", category=UserWarning)
            work = self.work.compute()  # summed over ranks: every rank saves a checkpoint (Lightning's contract)
        checkpoint["advsel"] = {"p_up": self.p_up, "skipped_steps": self.skipped_steps, "lr": self.optimization.lr_set,
                                "train_metrics": self.metric_groups.train_group.state(), "work": work,
                                "accumulation": self.window.state_dict(self.trainer.strategy, self.model)}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        fit_checks.refuse_other_architecture(self.state_dict(), checkpoint.get("state_dict", {}),
                                             type(self.model).__name__)
        state = checkpoint.get("advsel", {})
        self.guards.skipped_steps = int(state.get("skipped_steps", 0))
        if state.get("lr") is not None:  # a learning rate set on the module (`lr`); None: the factory's
            self.lr = state["lr"]
        self.metric_groups.train_group.load_state(state.get("train_metrics", {}))
        self.window.load_state_dict(state.get("accumulation", {}), int(checkpoint.get("global_step", 0)))
        # Summed over ranks when saved: rank 0 continues from them, so the sum stays right for any world size.
        self.work.restore(state.get("work", {}), holds_totals=self.global_rank == 0)
        p_up = state.get("p_up", self.p_up)
        if not (isinstance(p_up, float) and math.isfinite(p_up) and 0 < p_up <= 1):
            rank_zero_warn(f"checkpoint holds an invalid p_up={p_up!r}; keeping p_up={self.p_up}")
            return
        self.p_up = p_up
