"""Adaptive ``P_up`` (DS paper, eq. 9): the fraction of the pool backpropagated follows the last accuracy."""

from __future__ import annotations

import math
import re
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_advsel.callbacks.schedules import P_UP_MODES, PUpMode, next_p_up
from lightning_advsel.checks import check_choice, check_fraction
from lightning_advsel.step import check_selection_module


class AdaptivePUp(Callback):
    """Sets ``pl_module.p_up`` at the start of every training epoch from the accuracy of the epoch before.

    Epoch 0 uses ``initial_p_up`` (the paper's ``P_up(0) = 1``). At the end of each training epoch (after its
    validation) the callback reads ``monitor`` from ``trainer.callback_metrics`` and computes the next value
    with :func:`~lightning_advsel.callbacks.schedules.next_p_up`. The value is computed on rank 0 and
    broadcast, so every DDP rank trains with the same ``P_up``. The module logs the value it used as
    ``train/p_up``; this callback logs nothing.

    The next value is part of the callback's checkpoint state, so a resumed run continues the sequence. It is
    computed in ``on_train_epoch_end``, which is where ``ModelCheckpoint`` saves by default when validation
    runs every epoch; a checkpoint written earlier in the epoch (``save_on_train_epoch_end=False``) holds the
    state of the epoch before.

    Args:
        monitor: key of ``trainer.callback_metrics`` that drives the schedule. The default ``"train/acc"`` is
            the module's accuracy over the whole scoring pool (clean and adversarial rows) of the epoch, which
            exists for every recipe and every epoch; ``"val/acc_clean"`` or ``"val/acc_robust"`` follow the
            validation accuracies instead (the last available value when validation is not run every epoch).
        mode: ``"paper"``: ``P_up(t) = (1 - acc(t-1)) * P_up(t-1)`` (eq. 9); ``"complement"``:
            ``P_up(t) = 1 - acc(t-1)``. Both are clipped to ``[min_p_up, 1]``.
        min_p_up: floor of ``P_up``. The default 0.1 keeps a tenth of the pool (13 of the 128 rows of the
            digits config) in every backward pass; the unfloored recursion falls below 1% within three epochs
            at 80% accuracy, one or two rows per step, where the gradient is mostly noise.
        initial_p_up: ``P_up(0)``, the value of the first epoch.

    Raises:
        ValueError: for an unknown ``mode``, ``min_p_up`` or ``initial_p_up`` outside (0, 1], ``initial_p_up``
            below ``min_p_up``, an empty ``monitor``; at the end of an epoch, a ``monitor`` missing from
            ``trainer.callback_metrics`` (the message lists the keys there) or an accuracy outside [0, 1].
    """

    def __init__(self, monitor: str = "train/acc", mode: PUpMode = "paper", min_p_up: float = 0.1,
                 initial_p_up: float = 1.0) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"`monitor` must be a non-empty metric key such as 'train/acc', got {monitor!r}")
        check_choice("mode", mode, P_UP_MODES)
        check_fraction("min_p_up", min_p_up)
        check_fraction("initial_p_up", initial_p_up)
        if initial_p_up < min_p_up:
            raise ValueError(f"`initial_p_up` must be >= `min_p_up`={min_p_up}, got {initial_p_up}")
        self.monitor = monitor
        self.mode = mode
        self.min_p_up = float(min_p_up)
        self.initial_p_up = float(initial_p_up)
        self.next_value = self.initial_p_up
        self.history: list[float] = []  # P_up used in epochs 0, 1, ...
        self.accs: list[float] = []  # monitored accuracy of epochs 0, 1, ...

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_selection_module(pl_module, type(self).__name__)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Fail before the first step when the module says which accuracies it logs; other modules are checked
        # at the end of the first epoch, when the logged keys are known.
        known = getattr(pl_module, "accuracy_keys", None)
        # With several validation loaders each key carries Lightning's "/dataloader_idx_{i}" suffix.
        if callable(known) and re.sub(r"/dataloader_idx_\d+$", "", self.monitor) not in known():
            raise self._missing_monitor(known())

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.p_up = self.next_value
        del self.history[trainer.current_epoch:]  # a resumed run may repeat epochs past its checkpoint
        self.history.append(self.next_value)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank reads the metrics: computing a torchmetrics value syncs it, a collective all ranks must join.
        acc = trainer.strategy.broadcast(self._read_monitor(trainer), src=0)
        value = next_p_up(self.history[-1], acc, self.mode, self.min_p_up)
        del self.accs[trainer.current_epoch:]
        self.accs.append(acc)
        self.next_value = value

    def _missing_monitor(self, keys: Any) -> ValueError:
        return ValueError(
            f"AdaptivePUp: `monitor`={self.monitor!r} is not among the logged metrics; available keys: "
            f"{sorted(keys)}. Pick one of them (an accuracy in [0, 1])."
        )

    def _read_monitor(self, trainer: L.Trainer) -> float:
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            raise self._missing_monitor(metrics)
        acc = float(metrics[self.monitor])
        if not (math.isfinite(acc) and 0 <= acc <= 1):
            raise ValueError(f"AdaptivePUp: `monitor`={self.monitor!r} must be an accuracy in [0, 1], got {acc}")
        return acc

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"next_value": self.next_value, "history": list(self.history), "accs": list(self.accs)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.next_value = float(state_dict.get("next_value", self.initial_p_up))
        self.history = [float(v) for v in state_dict.get("history", [])]
        self.accs = [float(v) for v in state_dict.get("accs", [])]
