"""What the module refuses before the first training step, as functions of the Trainer and the model.

Each raises a ``ValueError`` that names the setting at fault and how to fix it, where Lightning would otherwise
accept a setting it cannot honour under manual optimization, or fail later with a message about its own internals.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import StochasticWeightAveraging
from torch import Tensor, nn


def refuse_trainer_settings(trainer: Any, module_name: str) -> None:
    """Refuse the Trainer's clipping and accumulation, naming the module's arguments of the same names.

    Lightning checks the Trainer against manual optimization with a message that names the Trainer's arguments
    only; a user of the module needs to hear where the setting went.

    Raises:
        ValueError: for a Trainer with ``gradient_clip_val`` > 0 or ``accumulate_grad_batches`` != 1.
    """
    for name, value, unset in (("gradient_clip_val", trainer.gradient_clip_val, (None, 0)),
                               ("accumulate_grad_batches", trainer.accumulate_grad_batches, (1,))):
        if value not in unset:
            also = " and `gradient_clip_algorithm`" if name == "gradient_clip_val" else ""
            raise ValueError(
                f"`Trainer({name}={value})` does not apply to {module_name}, which optimizes manually; "
                f"give `{name}`{also} to the module instead: {module_name}({name}={value}), or "
                f"`model.init_args.{name}: {value}` in a LightningCLI config, and leave the Trainer's unset"
            )


def refuse_sync_batchnorm(selection_scope: str, model: nn.Module) -> None:
    """Refuse SyncBatchNorm under the global selection scope, where ranks select different numbers of rows.

    Raises:
        ValueError: for ``selection_scope="global"`` and a model with ``nn.SyncBatchNorm`` layers.
    """
    if selection_scope == "global" and any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        raise ValueError(
            "`selection_scope`='global' lets ranks backpropagate different numbers of rows, which breaks "
            "SyncBatchNorm's contract of equal per-rank batches; use `selection_scope`='local' or train "
            "without `sync_batchnorm`"
        )


def refuse_weight_averaging(trainer: Any, model: nn.Module, module_name: str) -> None:
    """Refuse Lightning's ``StochasticWeightAveraging`` on a network with BatchNorm.

    Its extra last epoch recomputes the BatchNorm statistics of the averaged weights by a pass whose backward
    Lightning skips, which only automatic optimization honours: under manual optimization that epoch would train
    the averaged weights one more adversarial epoch. Without BatchNorm there is no such epoch, and it is allowed.

    Raises:
        ValueError: for a ``StochasticWeightAveraging`` callback and a network with BatchNorm layers.
    """
    swa = next((c for c in trainer.callbacks if isinstance(c, StochasticWeightAveraging)), None)
    if swa is not None and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError(
            f"`{type(swa).__name__}` recomputes BatchNorm statistics in an extra epoch whose backward only "
            f"automatic optimization skips; {module_name} optimizes manually, so that epoch would "
            "train the averaged weights further. Use `lightning.pytorch.callbacks.EMAWeightAveraging` (or "
            "`WeightAveraging`), which averages the BatchNorm statistics with the weights, or a network without "
            "BatchNorm"
        )


def refuse_empty_training(trainer: Any) -> None:
    """Refuse a training loader that yields no batch, before the sanity check and the first step.

    Lightning only warns and runs zero steps (a shuffled empty loader fails in ``RandomSampler``, an unshuffled
    one does not). ``estimated_stepping_batches`` loads the training loader, as Lightning documents for
    ``configure_optimizers``; on a resume it is left to Lightning's own order, because loading early would skip
    restoring a stateful loader's checkpointed position.

    Raises:
        ValueError: for a training loader of zero batches (an empty training set, or ``drop_last`` with fewer
            samples than ``batch_size``).
    """
    if trainer.ckpt_path is not None or trainer.limit_train_batches == 0:
        return
    trainer.estimated_stepping_batches  # noqa: B018 - loads the training loader and counts its batches
    if trainer.num_training_batches == 0:
        raise ValueError(
            "the training data loader yields no batches (an empty training set, or `drop_last` with fewer "
            "samples than the batch size); check the data set and its split sizes"
        )


def refuse_unmonitored_plateau(scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau, interval: str,
                               trainer: Any) -> None:
    """Check that a ``ReduceLROnPlateau`` names the metric it follows (``monitor``, which Lightning's CLI
    subclass has) and that the fit logs it at the end of each epoch.

    Raises:
        ValueError: for torch's class (no ``monitor``), a ``scheduler_interval`` other than ``"epoch"``, or a
            validation metric when the fit runs no validation (``limit_val_batches`` 0).
    """
    monitor = getattr(scheduler, "monitor", None)
    if not isinstance(monitor, str) or not monitor:
        raise ValueError(
            f"`lr_scheduler` {type(scheduler).__name__} needs the metric it follows, got monitor={monitor!r}: use "
            "lightning.pytorch.cli.ReduceLROnPlateau with `monitor`, e.g. monitor='val/acc_robust', mode='max'"
        )
    if interval != "epoch":
        raise ValueError(f"`scheduler_interval` must be 'epoch' for ReduceLROnPlateau (it follows an epoch's "
                         f"metric), got {interval!r}")
    if monitor.startswith("val/") and trainer is not None and trainer.limit_val_batches == 0:
        raise ValueError(f"`lr_scheduler` ReduceLROnPlateau follows monitor={monitor!r}, but this fit runs no "
                         "validation (`limit_val_batches` is 0)")


def refuse_other_architecture(own: dict[str, Tensor], saved: dict[str, Tensor], model_name: str) -> None:
    """Refuse a checkpoint whose ``model.*`` weights do not fit the module's ``model``.

    Args:
        own: the module's state dict.
        saved: the checkpoint's state dict.
        model_name: the class name of the module's ``model``, for the message.

    Raises:
        ValueError: naming the missing and unexpected keys and the shape mismatches.
    """
    own = {k: v for k, v in own.items() if k.startswith("model.")}
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
            f"({model_name}): missing keys [{head(missing)}], unexpected keys "
            f"[{head(unexpected)}], shape mismatches [{head(shapes)}]; build the module with the model "
            f"the checkpoint was trained with"
        )
