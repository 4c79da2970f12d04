"""Which samples are attacked and which are backpropagated: small strategies over per-sample scores.

Two stages use this file:

* **After the attack** (the data-selection rule, Algorithm 1 of the DS paper): a pool of clean and
  adversarial samples is scored by per-sample cross-entropy (eq. 7-8) and the top ``P_up`` fraction is
  backpropagated (:func:`top_k`), or a uniformly random ``P_up`` fraction (:func:`random_k`, the paper's
  random-robust baseline).
* **Before the attack** (selective adversarial training): every sample of the clean batch gets a score
  from one no-grad forward pass and only the highest-scoring ``attack_frac`` of the batch is attacked.
  The scores are registered in :data:`PRE_ATTACK_SCORES`; higher always means "attack first".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def check_fraction(name: str, value: float) -> float:
    """Return ``value`` if it is a number in (0, 1], else raise an error naming ``name``.

    Raises:
        ValueError: if ``value`` is not a finite number in (0, 1].
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a number in (0, 1], got {value!r}")
    if not 0 < value <= 1:
        raise ValueError(f"`{name}` must be in (0, 1], got {value}")
    return float(value)


def fraction_count(n: int, fraction: float) -> int:
    """How many of ``n`` samples a ``fraction`` keeps: rounded half up, at least one when ``n > 0``."""
    if n == 0:
        return 0
    return min(n, max(1, math.floor(fraction * n + 0.5)))


def top_k(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores (the data-selection rule), in ascending index order."""
    if k >= scores.numel():
        return torch.arange(scores.numel(), device=scores.device)
    return torch.topk(scores, k, sorted=False).indices.sort().values


def random_k(n: int, k: int, *, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """``k`` of ``n`` indices drawn uniformly without replacement, in ascending order."""
    if k >= n:
        return torch.arange(n, device=device)
    return torch.randperm(n, generator=generator, device=device)[:k].sort().values


def per_sample_loss(logits: Tensor, y: Tensor) -> Tensor:
    """The DS paper's error signal (eq. 7-8): per-sample cross-entropy."""
    return F.cross_entropy(logits.float(), y, reduction="none")


@dataclass
class ScoringPass:
    """What one no-grad forward pass over the clean batch produced, handed to a pre-attack score.

    Attributes:
        model: the network (in the mode the scoring pass ran in).
        x: clean inputs in [0, 1].
        y: labels.
        logits: the model's logits for ``x``.
        features: inputs of the model's last ``nn.Linear`` (penultimate features) when the score asked
            for them, else ``None``.
        generator: random generator of this training step.
    """

    model: nn.Module
    x: Tensor
    y: Tensor
    logits: Tensor
    features: Tensor | None = None
    generator: torch.Generator | None = None


def margin_score(p: ScoringPass) -> Tensor:
    """Minus the gap between the two largest logits: samples nearest the decision boundary score highest."""
    top2 = p.logits.float().topk(2, dim=1).values
    return -(top2[:, 0] - top2[:, 1])


def loss_score(p: ScoringPass) -> Tensor:
    """Clean cross-entropy: the hardest clean samples score highest."""
    return per_sample_loss(p.logits, p.y)


def random_score(p: ScoringPass) -> Tensor:
    """Uniform noise: a random subset is attacked (baseline)."""
    return torch.rand(p.y.shape[0], generator=p.generator, device=p.y.device)


@dataclass(frozen=True)
class PreAttackScore:
    """A named pre-attack score. ``needs_features`` asks the scoring pass for penultimate features."""

    fn: Callable[[ScoringPass], Tensor]
    needs_features: bool = False


PRE_ATTACK_SCORES: dict[str, PreAttackScore] = {
    "margin": PreAttackScore(margin_score),
    "loss": PreAttackScore(loss_score),
    "random": PreAttackScore(random_score),
}


def last_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` registered in ``model``, taken as its classification head.

    Raises:
        ValueError: if the model has no ``nn.Linear``.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"this score needs a model whose final layer is an `nn.Linear` (its input is the penultimate "
            f"feature vector), got {type(model).__name__} with no `nn.Linear`"
        )
    return linears[-1]
