"""The gradient-accumulation window of a manually optimized module: when to backpropagate unsynced, when to step.

Lightning refuses ``accumulate_grad_batches`` and ``gradient_clip_val`` on the Trainer under manual optimization,
so the module takes them and :class:`AccumulationWindow` does what the Trainer would: each batch's loss is divided
by the window's length, the optimizer steps (after clipping) when the window is full or the epoch ends, and under
DDP only the window's closing backward all-reduces (``no_sync`` before it). A checkpoint taken inside a window
holds the window's gradients, averaged over ranks, so a resumed run steps exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal, get_args

from torch import Tensor, nn

from lightning_advsel import checks, distributed

ClipAlgorithm = Literal["norm", "value"]


class AccumulationWindow:
    """The window's settings and state; its methods take the LightningModule that owns the optimizer.

    The module passed in needs Lightning's ``optimizers()``, ``manual_backward()``, ``clip_gradients()`` and
    ``trainer`` (``strategy``, ``is_last_batch``); ``model`` is the network whose gradients the window holds.

    Args:
        batches: step the optimizer every this many batches (``accumulate_grad_batches``).
        clip_val: clip the gradients before each step at this value (``None`` or 0: no clipping).
        clip_algorithm: ``"norm"`` (the total norm of all gradients) or ``"value"`` (each element).

    Attributes:
        batches_trained: every training batch so far, skipped ones included: what seeds a batch's random draws
            under accumulation, where the optimizer step stays put for a window of batches.

    Raises:
        ValueError: for ``batches`` below 1, a negative ``clip_val`` or an unknown ``clip_algorithm``.
    """

    def __init__(self, batches: int = 1, clip_val: float | None = None, clip_algorithm: ClipAlgorithm = "norm") -> None:
        self.batches = checks.check_int("accumulate_grad_batches", batches, 1)
        if clip_val is not None:
            checks.check_number("gradient_clip_val", clip_val, 0.0)
        self.clip_val = clip_val
        self.clip_algorithm = checks.check_choice("gradient_clip_algorithm", clip_algorithm, get_args(ClipAlgorithm))
        self.batches_trained = 0
        self.window_batches = 0  # batches seen since the last optimizer step
        self.has_grads = False  # whether any of them was backpropagated
        # Whether the batches before the window's closing one left this rank's gradients unsynced (DDP's no_sync).
        self.grads_unsynced = False
        self.restored_grads: list[Tensor | None] | None = None  # a checkpoint's window, until the model is placed

    def seed_offset(self, global_step: int) -> int:
        """What seeds a training batch's generator: the optimizer step, or under accumulation the batch count."""
        return global_step if self.batches == 1 else self.batches_trained

    def backward(self, module: Any, loss: Tensor) -> None:
        """Backpropagate one batch's ``loss``: divided by the window's length, and inside a window under DDP's
        ``no_sync`` (the closing backward averages the sum over ranks). The first of a window zeroes the gradients."""
        if not self.has_grads:
            module.optimizers().zero_grad()
        trainer = module.trainer
        if self.batches == 1:
            module.manual_backward(loss)
        elif self.window_batches + 1 < self.batches and not trainer.is_last_batch:
            with self._no_sync(trainer.strategy):
                module.manual_backward(loss / self.batches)
            self.grads_unsynced = distributed.world_size(trainer.strategy) > 1
        else:
            module.manual_backward(loss / self.batches)
            self.grads_unsynced = False
        self.has_grads = True

    def end_batch(self, module: Any) -> bool:
        """Count a batch, trained or skipped; at the window's end (or the epoch's last batch), clip and step the
        optimizer if any batch of the window was backpropagated. Returns whether it stepped."""
        self.batches_trained += 1
        self.window_batches += 1
        if self.window_batches < self.batches and not module.trainer.is_last_batch:
            return False
        stepped = self.has_grads
        if stepped:
            self.sync(module.trainer.strategy, module.model)
            optimizer = module.optimizers()
            if self.clip_val:
                module.clip_gradients(optimizer, gradient_clip_val=self.clip_val,
                                      gradient_clip_algorithm=self.clip_algorithm)
            optimizer.step()
        self.window_batches, self.has_grads = 0, False
        return stepped

    def sync(self, strategy: Any, model: nn.Module) -> None:
        """Average over ranks the gradients that unsynced backwards left (the closing batch was skipped, or a
        checkpoint is taken inside the window): after it every rank holds what DDP's all-reduce would give."""
        if self.grads_unsynced:
            distributed.average_grads_over_ranks(strategy, [p for p in model.parameters() if p.requires_grad])
            self.grads_unsynced = False

    def optimizer_steps(self, trainer: Any) -> int | float:
        """The optimizer steps of a fit: ``trainer.estimated_stepping_batches`` counted with this window (the
        Trainer does not know it), a last partial window of an epoch included."""
        estimate = trainer.estimated_stepping_batches  # loads the training data when needed
        batches = trainer.num_training_batches
        if self.batches == 1 or trainer.max_epochs == -1 or batches == float("inf"):
            return estimate  # counted in optimizer steps already: max_steps, or one step per batch
        steps = math.ceil(batches / self.batches) * max(trainer.max_epochs, 1)
        return steps if trainer.max_steps == -1 else min(steps, trainer.max_steps)

    def state_dict(self, strategy: Any, model: nn.Module) -> dict[str, Any]:
        """The window in progress, for a checkpoint: with its gradients (averaged over ranks) when one is open.
        Every rank saves (Lightning's contract), so every rank takes part in the average."""
        grads = None
        if self.window_batches > 0 and self.has_grads:
            self.sync(strategy, model)
            grads = [None if p.grad is None else p.grad.detach().cpu().clone() for p in model.parameters()]
        return {"batches_trained": self.batches_trained, "window_batches": self.window_batches, "grads": grads}

    def load_state_dict(self, state: dict[str, Any], global_step: int) -> None:
        """Continue a saved window; its gradients wait for :meth:`restore_grads`."""
        # A checkpoint from before accumulation existed was taken at a step's end: one batch per step.
        self.batches_trained = int(state.get("batches_trained", global_step))
        self.window_batches = int(state.get("window_batches", 0))
        self.restored_grads = state.get("grads")
        self.has_grads = self.restored_grads is not None

    def restore_grads(self, model: nn.Module) -> None:
        """Put a checkpoint's window gradients on ``model``, once it is on its device."""
        if self.restored_grads is None:
            return
        for param, grad in zip(model.parameters(), self.restored_grads, strict=True):
            param.grad = None if grad is None else grad.to(param.device)
        self.restored_grads = None

    @staticmethod
    def _no_sync(strategy: Any) -> AbstractContextManager:
        """DDP's ``no_sync`` for a backward inside a window (nothing on a single device)."""
        block = getattr(strategy, "block_backward_sync", None)
        return block() if block is not None else nullcontext()
