"""What changes from one training batch to the next: the step settings under the warm-ups, and the batch's seed.

:class:`Warmup` holds the module's warm-up arguments and gives each batch its
:class:`~lightning_advsel.step.StepSettings`: during ``attack_warmup_epochs`` the selective recipes attack every
row (or a random ``attack_frac``), and during ``eps_warmup_epochs`` the training attack's radius rises batch by
batch. Both are pure functions of the epoch and the batch index, so a resumed run continues them.
:func:`seeded_generator` gives each batch its own random draws (PGD starts, random picks), the same after a resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch

from lightning_advsel import checks, schedules
from lightning_advsel.step import StepSettings

WarmupPick = Literal["all", "random"]


@dataclass(frozen=True)
class Warmup:
    """The warm-ups of a run, checked when built.

    Attributes:
        attack_epochs: epochs at the start in which the selective recipes attack every row, or random rows; 0: none.
        attack_pick: what they attack then: ``"all"`` (``attack_frac`` 1) or ``"random"`` (a random
            ``attack_frac`` of the batch).
        eps_epochs: epochs (fractions allowed) over which the training attack's ``eps`` and ``alpha`` rise
            linearly (:func:`~lightning_advsel.schedules.warmup_factor`); 0: the full radius from the first step.

    Raises:
        ValueError: for a negative or non-integer ``attack_epochs``, an unknown ``attack_pick`` or a negative
            ``eps_epochs``; the messages name the module's arguments.
    """

    attack_epochs: int = 0
    attack_pick: WarmupPick = "all"
    eps_epochs: float = 0.0

    def __post_init__(self) -> None:
        checks.check_choice("attack_warmup", self.attack_pick, get_args(WarmupPick))
        checks.check_int("attack_warmup_epochs", self.attack_epochs, 0)
        object.__setattr__(self, "eps_epochs",
                           checks.check_number("eps_warmup_epochs", self.eps_epochs, 0.0, unit="epochs"))

    def settings(self, base: StepSettings, epoch: int, batch_idx: int, batches: int | float) -> StepSettings:
        """``base`` as batch ``batch_idx`` of ``epoch`` runs it, in an epoch of ``batches`` batches."""
        settings = base
        if epoch < self.attack_epochs:  # the first epochs attack every row, or random ones
            settings = (replace(settings, attack_frac=1.0) if self.attack_pick == "all"
                        else replace(settings, attack_score="random", attack_sampling="top"))
        if self.eps_epochs:  # the radius ramp: a smaller ball early in training
            settings = replace(settings, train_attack=settings.train_attack.scaled(self.eps_factor(epoch, batch_idx,
                                                                                                    batches)))
        return settings

    def eps_factor(self, epoch: int, batch_idx: int, batches: int | float) -> float:
        """The radius ramp's factor at a batch: epochs done, counting it (whole epochs when the loader has no
        length)."""
        within = (batch_idx + 1) / batches if math.isfinite(batches) and batches > 0 else 1.0
        return schedules.warmup_factor(epoch + within, self.eps_epochs)


def seeded_generator(seed: int, offset: int, rank: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from ``(seed, offset, rank)``: the training step's offset is its optimizer
    step (or batch count under accumulation), an evaluation batch's ``-(batch_idx + 1)``."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + offset * 7919 + rank) % (2**63 - 1))
    return gen
