"""The module's ``compile_attack`` option: which compiled attacks it holds, when it builds them, and what it says.

:class:`AttackCompilation` holds the two :class:`~lightning_advsel.compiled_attack.CompiledPGD` of a run, built
once each and only when first needed (a module that is pickled before fit, as ``ddp_spawn`` does, carries no
compiled function):

* the training attack's, at training start, once the training loader is known: its ``max_graphs`` is the number
  of attacked row counts :func:`~lightning_advsel.static_shapes.attack_sizes` lists for the loader's batch size,
  its smaller last batch and the attack warm-up, so a batch of any other size runs eagerly and says so;
* the evaluation attack's (validation, test and prediction PGD), in ``"eval"`` model mode, at the first evaluation
  batch, bounded by :data:`EVAL_GRAPHS` (a full and a last batch per loader and attack).

Both replay as CUDA graphs on a GPU (``torch.compile`` mode ``"reduce-overhead"``) and use the default mode
elsewhere. :meth:`AttackCompilation.plan` is the one line a fit prints about it
(:func:`~lightning_advsel.static_shapes.compile_plan`): what compiles, at which sizes, or why the attack stays eager.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_advsel import checks
from lightning_advsel.batch_schedule import Warmup
from lightning_advsel.compiled_attack import CompiledPGD, check_torch, eager_reason
from lightning_advsel.static_shapes import attack_sizes, compile_plan, last_batch_rows
from lightning_advsel.step import StepSettings

# Graphs of the evaluation attack: a full and a smaller last batch for a validation, a test and a prediction loader,
# with room for a second loader; past it a batch runs eagerly, said once.
EVAL_GRAPHS = 8


def loader_rows(loader: Any) -> tuple[int, int | None] | None:
    """``(batch size, rows of a smaller last batch or None)`` of a training loader with a fixed batch size; ``None``
    for anything else (several loaders, a batch sampler of its own, an iterable data set of unknown length)."""
    if not isinstance(loader, DataLoader) or not isinstance(loader.batch_size, int):
        return None
    try:  # the sampler's length is this rank's share under DDP; a resumed epoch skips whole batches of it
        rows = len(loader.sampler)
    except TypeError:
        return None
    return loader.batch_size, last_batch_rows(rows, loader.batch_size, loader.drop_last)


class AttackCompilation:
    """The module's ``compile_attack``: off, or the compiled training and evaluation attacks of a run.

    Args:
        enabled: the module's ``compile_attack``.

    Attributes:
        backend: ``torch.compile``'s backend for both attacks: ``"inductor"``; a test sets a cheaper one
            (``"aot_eager"``) on the class.
        train: the training attack's ``CompiledPGD`` once training started, else ``None`` (also when the recipe
            attacks nothing or the attack cannot be one graph: the training step then runs the eager attack).
        eval: the evaluation attack's ``CompiledPGD`` once an evaluation batch was attacked, else ``None``.

    Raises:
        ValueError: for an ``enabled`` that is not a bool (naming ``compile_attack``).
        RuntimeError: when enabled, on a torch release too old for the compiled attack
            (:func:`~lightning_advsel.compiled_attack.check_torch`).
    """

    backend: str | Callable = "inductor"

    def __init__(self, enabled: bool) -> None:
        self.enabled = checks.check_bool("compile_attack", enabled)
        if self.enabled:
            check_torch()
        self.train: CompiledPGD | None = None
        self.eval: CompiledPGD | None = None

    def _build(self, device: torch.device, max_graphs: int) -> CompiledPGD:
        # CUDA graphs replay the attack in a few launches; they exist on CUDA and with inductor only.
        cuda = device.type == "cuda" and self.backend == "inductor"
        return CompiledPGD(backend=self.backend, mode="reduce-overhead" if cuda else None, max_graphs=max_graphs)

    def plan(self, settings: StepSettings, warmup: Warmup, selection_scope: str, model: nn.Module, loader: Any,
             device: torch.device) -> str | None:
        """Build the training attack (once) and return the line that says what compiles; ``None`` when off.

        Args:
            settings: the module's step settings.
            warmup: the module's warm-ups (the attack warm-up attacks every row, a size of its own).
            selection_scope: the module's ``selection_scope``.
            model: the classifier on pixels, as the attack sees it.
            loader: the trainer's training loader.
            device: where the attack runs.
        """
        if not self.enabled:
            return None
        reason = eager_reason(model, settings.train_attack.mode)
        rows = loader_rows(loader)
        if not settings.attacks or reason is not None:  # nothing compiles: the training step keeps the eager attack
            return compile_plan(settings, rows[0] if rows else 1, eager_attack_reason=reason)
        if rows is None:
            line = (f"compile_attack: the training loader ({type(loader).__name__}) has no fixed batch size, so the "
                    f"attack's sizes are not known ahead; up to {EVAL_GRAPHS} graphs compile, a batch past them "
                    f"runs eagerly and says so")
            max_graphs = EVAL_GRAPHS
        else:
            batch_size, last = rows
            line = compile_plan(settings, batch_size, last, attack_warmup_epochs=warmup.attack_epochs,
                                attack_warmup=warmup.attack_pick, selection_scope=selection_scope, model=model)
            max_graphs = len(attack_sizes(settings, [batch_size] if last is None else [batch_size, last],
                                          warmup.attack_epochs, warmup.attack_pick))
        if self.train is None:
            self.train = self._build(device, max(1, max_graphs))
        return line

    def evaluation(self, device: torch.device) -> CompiledPGD | None:
        """The evaluation attack's ``CompiledPGD``, built at its first use; ``None`` when off."""
        if not self.enabled:
            return None
        if self.eval is None:
            self.eval = self._build(device, EVAL_GRAPHS)
        return self.eval
