"""The checks every batch passes before any work, agreed across DDP ranks, and the non-finite policy.

Training, evaluation and prediction read a batch through one path, :meth:`BatchGuards.check_batch`:

1. once per process, the model maps a batch to ``(B, num_classes)`` logits;
2. the labels are integer class indices (int64 from then on);
3. one all-reduce tells every rank whether any rank's inputs hold a NaN or inf and whether any rank's labels lie
   outside ``[0, num_classes)`` (:func:`agree`): every rank then raises, or skips, together, so no rank is left
   waiting in a collective that the others never reach;
4. non-finite inputs: training follows the ``nonfinite`` policy (raise, or skip the step on every rank and count
   it); evaluation and prediction with an attack raise, since the attack needs finite pixels;
5. once per process and stage, the attack's own checks of a batch (pixels in [0, 1]); the attack then runs
   unchecked, without the host waits those checks cost.

The training loss goes through the same policy (:meth:`BatchGuards.skips`) after the step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_advsel import checks, distributed
from lightning_advsel.attacks import AttackConfig, model_mode

Nonfinite = Literal["raise", "skip"]
NONFINITE = get_args(Nonfinite)
HINT = "; set `nonfinite: skip` to drop such steps instead"


def agree(strategy: Any, flags: Tensor, counts: Sequence[int] = ()) -> tuple[list[bool], list[bool], list[int]]:
    """This rank's ``flags``, whether any rank raised each, and ``counts`` summed over ranks.

    One all-reduce and one copy to the host, the call's only wait for the device (the counts reach it as kernel
    arguments, not as a copy from the host, which would be a second wait).
    """
    mine = torch.cat([flags.long(), *(flags.new_full((1,), c, dtype=torch.long) for c in counts)])
    anyone = distributed.sum_over_ranks(strategy, mine.clone())
    local, total = torch.stack([mine, anyone]).tolist()
    n = flags.numel()
    return [bool(v) for v in local[:n]], [bool(v) for v in total[:n]], total[n:]


def as_labels(y: Any, batch_idx: int) -> Tensor:
    """The batch's labels as int64 class indices (any integer dtype is accepted).

    Raises:
        ValueError: for labels that are not an integer tensor.
    """
    if not isinstance(y, Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        got = y.dtype if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"batch {batch_idx} has labels of type {got}; labels must be integer class indices "
                         f"(torch.long, or any integer dtype)")
    return y.long()  # cross-entropy takes int64 targets only


class BatchGuards:
    """The batch checks of one module, the ``nonfinite`` policy and the count of the steps it skipped.

    Args:
        num_classes: classes of the task; labels must lie in ``[0, num_classes)``.
        nonfinite: ``"raise"`` or ``"skip"``: what a NaN or inf in a training batch or loss does.

    Attributes:
        skipped_steps: training steps skipped under ``nonfinite="skip"`` (checkpointed by the module).

    Raises:
        ValueError: for an unknown ``nonfinite``.
    """

    def __init__(self, num_classes: int, nonfinite: Nonfinite = "raise") -> None:
        self.num_classes = num_classes
        self.nonfinite = checks.check_choice("nonfinite", nonfinite, NONFINITE)
        self.skipped_steps = 0
        self._model_checked = False
        self._attack_checked: set[str] = set()  # the stages whose first attacked batch was checked

    def check_batch(self, strategy: Any, model: nn.Module, x: Tensor, y: Any, batch_idx: int, stage: str,
                    attack: Any = None, *, global_step: int = 0,
                    log: Callable[..., Any] | None = None) -> Tensor | None:
        """The batch's labels as int64 class indices, checked on every rank; ``None`` when training skips it.

        Args:
            strategy: the Lightning strategy, for the agreement across ranks.
            model: the classifier on pixels, whose output is checked once.
            x: the batch's inputs, pixels.
            y: its labels.
            batch_idx: the batch's index, for the messages.
            stage: ``"train"``, ``"val"``, ``"test"`` or ``"predict"``.
            attack: the stage's attack, or ``None`` when it attacks nothing.
            global_step: the optimizer step, for the training messages.
            log: the module's ``log``, for ``train/skipped_steps``.

        Raises:
            ValueError: for a model output that is not ``(B, num_classes)``, labels that are not integers or lie
                outside ``[0, num_classes)`` on any rank, non-finite inputs on any rank (training under
                ``"raise"``, other stages with an attack), or, for the first attacked batch, pixels outside [0, 1].
        """
        self.check_model_output(model, x)
        y = as_labels(y, batch_idx)
        out_of_range = ((y < 0) | (y >= self.num_classes)).any()  # on the device: no host synchronisation
        mine, anyone, _ = agree(strategy, torch.stack([~torch.isfinite(x).all(), out_of_range]))
        # Training decides on its inputs first: a batch skipped whole needs no label check.
        if stage == "train" and self.skips(mine[0], anyone[0], "input", batch_idx, global_step, log):
            return None
        self._refuse_labels(y, batch_idx, mine[1], anyone[1])
        if attack is None:
            return y
        if anyone[0]:  # every rank raises, before any rank attacks
            raise ValueError(f"{stage} batch {batch_idx} holds NaN or inf inputs{'' if mine[0] else ' on another rank'}"
                             f"; the {stage} attack needs finite pixels in [0, 1]")
        if isinstance(attack, AttackConfig) and stage not in self._attack_checked:  # AutoAttack checks its own
            attack.check_batch(x, y)
            self._attack_checked.add(stage)
        return y

    def skips(self, bad: bool, anyone: bool, what: str, batch_idx: int, global_step: int,
              log: Callable[..., Any] | None = None, loss: Tensor | None = None) -> bool:
        """Whether to skip a training step that met a NaN or inf in its ``what`` (``"input"`` or ``"loss"``).

        Given whether this rank (``bad``) and any rank met one (agreed by :func:`agree`): False when none did;
        under ``"skip"`` counts the step, warns, logs ``train/skipped_steps`` through ``log`` and returns True.

        Raises:
            ValueError: for non-finite inputs under ``"raise"``.
            FloatingPointError: for a non-finite loss under ``"raise"``.
        """
        if not anyone:
            return False
        if self.nonfinite == "raise":
            if what == "input":
                raise ValueError(
                    f"training batch {batch_idx} (global step {global_step}) holds NaN or inf inputs"
                    f"{'' if bad else ' on another rank'}; inputs must be finite pixels in [0, 1]{HINT}"
                )
            value = loss.item() if loss is not None and bad else "non-finite on another rank"
            raise FloatingPointError(
                f"training loss is {value} at global step {global_step} (batch {batch_idx}); "
                f"lower the learning rate or check the data{HINT}"
            )
        self.skipped_steps += 1
        where = f"global step {global_step}, batch {batch_idx}"
        rank_zero_warn(f"skipped a training step ({where}): non-finite {what}; {self.skipped_steps} skipped so far")
        if log is not None:
            log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False, batch_size=1)
        return True

    def check_model_output(self, model: nn.Module, x: Tensor) -> None:
        """Once per process: the model maps a batch to ``(B, num_classes)`` logits.

        Raises:
            ValueError: naming the shape expected and the output received.
        """
        if self._model_checked or x.shape[0] == 0:
            return
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

    def _refuse_labels(self, y: Tensor, batch_idx: int, mine: bool, anyone: bool) -> None:
        """Raise on every rank when any rank's labels are out of range."""
        if not anyone:
            return
        last = self.num_classes - 1
        if not mine:
            raise ValueError(f"batch {batch_idx} has labels outside [0, {last}] on another rank")
        raise ValueError(f"batch {batch_idx} has labels in [{int(y.min())}, {int(y.max())}], outside [0, {last}] "
                         f"for `num_classes`={self.num_classes}")
