"""Training objectives: what the training forward minimises, what the attack maximises, what selection scores.

* ``"ce"``: cross-entropy on the pool's rows (clean or adversarial), optionally with label smoothing; the attack
  maximises the cross-entropy. A pool row is one input.
* ``"trades"`` (Zhang et al., 2019, arXiv:1901.08573): ``CE(f(x), y) + beta * KL(p(x) || p(x_adv))``; the attack
  maximises ``KL(p(x) || p(x_adv))`` for a fixed clean prediction ``p(x)``, from Gaussian noise of standard
  deviation 0.001. ``beta`` defaults to 6.
* ``"mart"`` (Wang et al., 2020, ICLR): a boosted cross-entropy on ``x_adv`` (the cross-entropy plus
  ``-log(1 - p_k(x_adv))`` for the most likely wrong class ``k``) plus ``lambda * KL(p(x) || p(x_adv)) * (1 -
  p_y(x))``, which weighs the consistency term by how badly the clean input is classified; the attack maximises
  the cross-entropy. ``lambda`` defaults to 5.

TRADES and MART are *paired*: every row of the batch is one sample made of its clean input and its adversarial
example, and the per-sample objective needs both. The selection rules then act on pairs (see
:mod:`lightning_advsel.step`): a selected pair is backpropagated whole, and a row that was not attacked (the
selective recipes) is its own pair, whose objective is the clean cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_advsel.attacks import Mode, model_mode
from lightning_advsel.checks import check_choice, check_number

ObjectiveName = Literal["ce", "trades", "mart"]
OBJECTIVES = get_args(ObjectiveName)
DEFAULT_WEIGHT = {"trades": 6.0, "mart": 5.0}  # beta of TRADES, lambda of MART (their papers' CIFAR-10 values)
TRADES_START_STD = 0.001  # pixels: TRADES starts its attack from this much Gaussian noise


def kl_rows(clean_logits: Tensor, adv_logits: Tensor) -> Tensor:
    """Per-row ``KL(p(x) || p(x_adv))`` over the classes, shape ``(B,)``."""
    log_clean = F.log_softmax(clean_logits.float(), dim=1)
    return (log_clean.exp() * (log_clean - F.log_softmax(adv_logits.float(), dim=1))).sum(dim=1)


def trades_loss(clean_logits: Tensor, adv_logits: Tensor, y: Tensor, beta: float) -> Tensor:
    """Per-sample TRADES objective ``CE(f(x), y) + beta * KL(p(x) || p(x_adv))``, shape ``(B,)``."""
    return F.cross_entropy(clean_logits.float(), y, reduction="none") + beta * kl_rows(clean_logits, adv_logits)


def mart_loss(clean_logits: Tensor, adv_logits: Tensor, y: Tensor, lam: float) -> Tensor:
    """Per-sample MART objective, shape ``(B,)``: boosted CE on ``x_adv`` plus the weighted KL term."""
    adv_probs = F.softmax(adv_logits.float(), dim=1)
    others = adv_probs.scatter(1, y.unsqueeze(1), -1.0)  # the true class can never be the runner-up
    runner_up = others.argmax(dim=1)
    boost = -torch.log((1.0001 - adv_probs.gather(1, runner_up.unsqueeze(1)).squeeze(1)).clamp_min(1e-12))
    true_clean = F.softmax(clean_logits.float(), dim=1).gather(1, y.unsqueeze(1)).squeeze(1)
    consistency = kl_rows(clean_logits, adv_logits) * (1.0000001 - true_clean)
    return F.cross_entropy(adv_logits.float(), y, reduction="none") + boost + lam * consistency


@dataclass(frozen=True)
class Objective:
    """A training objective and its settings.

    Attributes:
        name: ``"ce"``, ``"trades"`` or ``"mart"``.
        weight: ``beta`` of TRADES or ``lambda`` of MART, >= 0; ``None`` takes the paper's value
            (:data:`DEFAULT_WEIGHT`). Must be ``None`` for ``"ce"``.
        label_smoothing: label smoothing of the cross-entropy of ``"ce"``, in [0, 1).

    Raises:
        ValueError: for an unknown ``name``, a negative or non-finite ``weight``, a ``weight`` for ``"ce"``, or
            ``label_smoothing`` outside [0, 1) or set for a paired objective.
    """

    name: ObjectiveName = "ce"
    weight: float | None = None
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        check_choice("objective", self.name, OBJECTIVES)
        check_number("label_smoothing", self.label_smoothing, 0.0)
        if self.label_smoothing >= 1:
            raise ValueError(f"`label_smoothing` must be in [0, 1), got {self.label_smoothing}")
        if self.name == "ce":
            if self.weight is not None:
                raise ValueError(f"`objective_weight` is the beta of TRADES or the lambda of MART; the objective "
                                 f"'ce' takes none, got {self.weight}")
            return
        if self.label_smoothing:
            raise ValueError(f"`label_smoothing` applies to the objective 'ce' only, got {self.label_smoothing} "
                             f"with objective {self.name!r}")
        weight = DEFAULT_WEIGHT[self.name] if self.weight is None else self.weight
        object.__setattr__(self, "weight", check_number("objective_weight", weight, 0.0))

    @property
    def paired(self) -> bool:
        """Whether a sample is its clean input and adversarial example together (TRADES, MART)."""
        return self.name != "ce"

    @property
    def attacks_kl(self) -> bool:
        """Whether the training attack maximises the KL divergence to the clean prediction (TRADES) instead of the
        attack's own loss; it then forwards the attacked rows once more, for that prediction."""
        return self.name == "trades"

    def attack_reference(self, model: nn.Module, x: Tensor, mode: Mode) -> Tensor | None:
        """The clean logits of ``x``'s rows that TRADES's attack loss compares with, computed once, without
        gradients, in the attack's model ``mode``; ``None`` for the other objectives."""
        if not self.attacks_kl:
            return None
        with torch.no_grad(), model_mode(model, mode):
            return model(x)

    def attack_loss(self, model: nn.Module, x: Tensor, mode: Mode) -> Callable[[Tensor, Tensor], Tensor] | None:
        """What the training attack maximises on ``x``'s rows (``None``: the attack's own loss).

        TRADES's KL divergence is to the clean prediction (:meth:`attack_reference`).
        """
        clean = self.attack_reference(model, x, mode)
        return None if clean is None else lambda adv_logits, _y: kl_rows(clean, adv_logits)

    @property
    def start_std(self) -> float | None:
        """Gaussian start of the training attack (TRADES), else ``None`` (the attack's own random start)."""
        return TRADES_START_STD if self.name == "trades" else None

    def pair_loss(self, clean_logits: Tensor, adv_logits: Tensor, y: Tensor) -> Tensor:
        """Per-sample objective of (clean, adversarial) pairs, shape ``(B,)`` (paired objectives only)."""
        if self.name == "trades":
            return trades_loss(clean_logits, adv_logits, y, self.weight)
        return mart_loss(clean_logits, adv_logits, y, self.weight)

    def describe(self) -> str:
        if self.name == "ce":
            return "cross-entropy" + (f" (label smoothing {self.label_smoothing:g})" if self.label_smoothing else "")
        return f"{self.name.upper()} ({'beta' if self.name == 'trades' else 'lambda'} {self.weight:g})"
