"""The module's attack arguments read from configs and checkpoints, and the logits under an evaluation attack.

A config or a checkpoint's hyperparameters give an attack as a dict of its fields; :func:`as_attack` and
:func:`as_robust_attack` build the :class:`~lightning_advsel.attacks.AttackConfig` (or
:class:`~lightning_advsel.evaluation.AutoAttackConfig`, whose dict has a ``version``) it stands for, and
:func:`resolve_eval_attack` resolves ``"auto"``. :func:`attacked_logits` runs one of them on an evaluation or prediction
batch, seeded by the batch index alone, so the same weights give the same adversarial examples every time.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lightning_advsel.attacks import AttackConfig
from lightning_advsel.evaluation import AutoAttackConfig
from lightning_advsel.objectives import Objective
from lightning_advsel.step import Attacker

Auto = Literal["auto"]
AUTO: Auto = "auto"  # `eval_attack`'s default: PGD-20 at the training attack's radius


def as_attack(name: str, value: AttackConfig | dict | None) -> AttackConfig | None:
    """Argument ``name`` as an :class:`AttackConfig` (``None`` stays ``None``).

    Raises:
        ValueError: for a dict with a key that is not a field, or anything but an AttackConfig, a dict or None.
    """
    if value is None or isinstance(value, AttackConfig):
        return value
    if isinstance(value, dict):
        try:
            return AttackConfig(**value)
        except TypeError as err:
            raise ValueError(f"`{name}` has an unknown key: {err}") from err
    raise ValueError(f"`{name}` must be an AttackConfig or a dict of its fields, got {type(value).__name__}")


def as_robust_attack(name: str, value: AttackConfig | AutoAttackConfig | dict | None,
                     ) -> AttackConfig | AutoAttackConfig | None:
    """Argument ``name`` (``test_attack``, ``predict_attack``) as an AttackConfig or an AutoAttackConfig.

    Raises:
        ValueError: for a dict with a key that is not a field of the config it stands for, or another type.
    """
    if isinstance(value, AutoAttackConfig):
        return value
    if isinstance(value, dict) and "version" in value:
        try:
            return AutoAttackConfig(**value)
        except TypeError as err:
            raise ValueError(f"`{name}` has an unknown key for AutoAttackConfig: {err}") from err
    if value is not None and not isinstance(value, (AttackConfig, dict)):
        raise ValueError(
            f"`{name}` must be an AttackConfig, an AutoAttackConfig or a dict of either's fields, "
            f"got {type(value).__name__}"
        )
    return as_attack(name, value)


def resolve_eval_attack(value: AttackConfig | Auto | dict | None, train_attack: AttackConfig) -> AttackConfig | None:
    """``eval_attack`` as an AttackConfig: ``"auto"`` is PGD-20 at ``train_attack``'s ``eps`` and ``norm``, alpha 0.01.

    Raises:
        ValueError: for another string, or as :func:`as_attack`.
    """
    if isinstance(value, str) and value != AUTO:
        raise ValueError(f"`eval_attack` must be an AttackConfig, a dict of its fields, {AUTO!r} or None, "
                         f"got {value!r}")
    if value == AUTO:
        return AttackConfig(eps=train_attack.eps, alpha=0.01, steps=20, norm=train_attack.norm)
    return as_attack("eval_attack", value)


def attacked_logits(model: nn.Module, attack: AttackConfig | AutoAttackConfig, x: Tensor, y: Tensor,
                    batch_idx: int, generator: torch.Generator, num_classes: int,
                    attacker: Attacker | None = None) -> Tensor:
    """The logits of ``model`` on ``attack``'s examples of ``(x, y)``.

    Args:
        model: the classifier on pixels.
        attack: a PGD attack, or AutoAttack (seeded by ``batch_idx`` itself).
        x: inputs, pixels in [0, 1].
        y: int64 labels.
        batch_idx: the batch's index.
        generator: PGD's random starts, seeded by the batch index.
        num_classes: classes of the task, for AutoAttack.
        attacker: what runs a PGD attack (the module's compiled evaluation attack with ``compile_attack``);
            ``None``: the attack itself. AutoAttack always runs as its package does.

    The batch was checked (:meth:`~lightning_advsel.guards.BatchGuards.check_batch`), so a PGD attack runs
    without its own checks: the same examples, without their host waits.
    """
    if isinstance(attack, AutoAttackConfig):
        x_adv = attack(model, x, y, batch_idx=batch_idx, num_classes=num_classes)
    elif attacker is not None:  # the attack's own loss (the default objective): the examples of the line below
        x_adv = attacker(model, x, y, attack, generator, Objective())
    else:
        x_adv = attack.unchecked(model, x, y, generator=generator)
    with torch.no_grad():
        return model(x_adv)
