"""What a run spent: the training step's work, summed over steps and DDP ranks, against robust training's.

Every training step reports its work as a :class:`~lightning_advsel.step.StepCost` (sample-gradient steps of
the training attack, rows through a forward pass, rows through the parameter backward), counted from what it
ran. :class:`WorkCounter` adds those up as torchmetrics states summed over DDP ranks, together with what
``robust`` (PGD adversarial training) would have spent on the same batches (:func:`robust_cost`), so that a
run can say what share of robust training's compute it used without a second run.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from torchmetrics import Metric

from lightning_advsel.step import StepCost, StepSettings

COUNTERS = tuple(f.name for f in fields(StepCost))  # attack_grad_steps, forward_rows, backward_rows
LABELS = {"attack_grad_steps": "attack steps", "forward_rows": "forward rows", "backward_rows": "backward rows"}


def robust_cost(settings: StepSettings, batch_rows: int) -> StepCost:
    """What ``recipe="robust"`` would spend on a clean batch of ``batch_rows`` rows with the same attack.

    Robust training attacks every row (``steps x restarts`` sample-gradient steps each), then forwards and
    backpropagates the adversarial batch once; no scoring pass.
    """
    attack = settings.train_attack
    steps = attack.steps * attack.restarts if attack.enabled else 0
    return StepCost(attack_grad_steps=batch_rows * steps, forward_rows=batch_rows, backward_rows=batch_rows)


class WorkCounter(Metric):
    """Running totals of the training step's work and of robust training's on the same batches.

    States (int64, summed over DDP ranks): one per :class:`~lightning_advsel.step.StepCost` field, and the
    same with a ``robust_`` prefix. :meth:`compute` returns them as a dict of ints.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:  # noqa: ANN003 - Metric's keyword arguments
        super().__init__(**kwargs)
        for name in self.names():
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @staticmethod
    def names() -> list[str]:
        return [*COUNTERS, *(f"robust_{name}" for name in COUNTERS)]

    def update(self, cost: StepCost, robust: StepCost) -> None:
        for name in COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(cost, name))
            setattr(self, f"robust_{name}", getattr(self, f"robust_{name}") + getattr(robust, name))

    def compute(self) -> dict[str, int]:
        return {name: int(getattr(self, name)) for name in self.names()}

    def restore(self, totals: dict[str, int], holds_totals: bool) -> None:
        """Continue from the totals of a checkpoint (summed over ranks when it was written).

        The process with ``holds_totals`` (rank 0) takes them and the others start from zero, so that the
        sum over ranks is the saved total whatever the number of processes of the resumed run.
        """
        self.reset()
        self.merge_state({name: torch.tensor(int(totals.get(name, 0)) if holds_totals else 0, dtype=torch.long,
                                             device=self.device) for name in self.names()})


def _short(n: int) -> str:
    """``1234567`` as ``1.2e6``; small numbers as they are."""
    if abs(n) < 10_000:
        return str(n)
    mantissa, exponent = f"{n:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def summary(totals: dict[str, int]) -> str:
    """One line: each total and its share of robust training's, e.g. ``attack steps 1.2e6 (61% of robust
    training's), forward rows 3.1e4 (200%), backward rows 1.5e4 (100%)``."""
    parts = []
    for i, name in enumerate(COUNTERS):
        spent, robust = totals.get(name, 0), totals.get(f"robust_{name}", 0)
        part = f"{LABELS[name]} {_short(spent)}"
        if robust:
            share = f"{100 * spent / robust:.0f}%"
            part += f" ({share} of robust training's)" if i == 0 else f" ({share})"
        parts.append(part)
    return ", ".join(parts)
