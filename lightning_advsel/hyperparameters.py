"""What a checkpoint keeps of the module's constructor arguments: plain values that load without the code's objects.

Lightning saves the constructor's arguments as hyperparameters, and ``load_from_checkpoint`` and the command line
build the module again from them. :func:`save_plain_hyperparameters` keeps them plain: the attacks as dicts of their
fields (which the module's constructor reads back), no network when the module was built from Python (its weights
are in the state dict), no setting of ``predict`` alone, and not ``compile_attack`` (how the attack runs).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict
from types import FrameType
from typing import Any

from torch import nn

from lightning_advsel.attacks import AttackConfig
from lightning_advsel.evaluation import AutoAttackConfig

ATTACKS = ("train_attack", "eval_attack", "test_attack")  # kept as dicts of their fields


def save_plain_hyperparameters(module: Any, frame: FrameType | None) -> None:
    """Save the constructor arguments of ``module`` (a LightningModule), read from the constructor's ``frame``."""
    with warnings.catch_warnings():
        # Lightning warns that `model` is an nn.Module; it is dropped just below when built from Python.
        warnings.filterwarnings("ignore", message=r"Attribute 'model' is an instance of `nn.Module`")
        module.save_hyperparameters(frame=frame)
    if isinstance(module.hparams.get("model"), nn.Module):
        # Built from Python, not from the CLI: load with `load_from_checkpoint(path, model=Net())`.
        module.remove_ignored_hparams(["model", "optimizer", "lr_scheduler"])
        # Lightning also keeps a deep copy of the first hyperparameters (`hparams_initial`), which held the
        # network itself: a second copy of its weights for the module's lifetime. Saving the plain values
        # again replaces that copy.
        module.save_hyperparameters(dict(module.hparams))
    # A setting of `predict`, not of the trained model: kept out of the checkpoint, whose hyperparameters the
    # command line applies over its own when it loads one (`predict --ckpt_path ...` takes `predict_attack`).
    # `compile_attack` is how a run computes its attack, the same examples either way: a run resumed or evaluated on
    # another machine decides it there, and checkpoints keep the hyperparameters they had before the option.
    module.remove_ignored_hparams(["predict_attack", "compile_attack"])
    for key in ATTACKS:
        if isinstance(module.hparams.get(key), (AttackConfig, AutoAttackConfig)):
            module.hparams[key] = asdict(module.hparams[key])
