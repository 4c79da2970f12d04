"""The adaptive P_up schedule of the DS paper (eq. 9) as pure functions of the last accuracy.

``mode="paper"`` is eq. 9 with a floor: ``P_up(t) = max(min_p_up, (1 - acc(t-1)) * P_up(t-1))``, ``P_up(0) = 1``.
Taken literally the recursion shrinks geometrically (accuracy 0.8 gives 0.2, then 0.04), so the floor is what
keeps a useful number of rows in the backward pass. The recursion continues from the floored value, the
``P_up`` that was actually used.

``mode="complement"`` is not recursive: ``P_up(t) = clip(1 - acc(t-1), min_p_up, 1)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, get_args

from lightning_advsel.checks import check_choice, check_fraction, check_number

PUpMode = Literal["paper", "complement"]
P_UP_MODES: tuple[str, ...] = get_args(PUpMode)


def _check_accuracy(value: float) -> None:
    if check_number("acc", value, 0) > 1:
        raise ValueError(f"`acc` must be in [0, 1], got {value}")


def next_p_up(prev: float, acc: float, mode: PUpMode = "paper", min_p_up: float = 0.1) -> float:
    """The ``P_up`` of the next epoch from the one just used and the accuracy it reached.

    Args:
        prev: ``P_up(t-1)``, in (0, 1].
        acc: ``acc(t-1)``, the monitored accuracy of epoch ``t-1``, in [0, 1].
        mode: ``"paper"`` (eq. 9, recursive) or ``"complement"`` (``1 - acc``).
        min_p_up: floor of the result, in (0, 1].

    Returns:
        ``P_up(t)`` in ``[min_p_up, 1]``.

    Raises:
        ValueError: for an unknown ``mode`` or a value outside its interval.
    """
    check_choice("mode", mode, P_UP_MODES)
    check_fraction("prev", prev)
    _check_accuracy(acc)
    check_fraction("min_p_up", min_p_up)
    raw = (1.0 - acc) * prev if mode == "paper" else 1.0 - acc
    return float(min(1.0, max(min_p_up, raw)))


def p_up_sequence(accs: Iterable[float], mode: PUpMode = "paper", min_p_up: float = 0.1,
                  initial: float = 1.0) -> list[float]:
    """``P_up`` of every epoch: ``[P_up(0), P_up(1), ...]`` from the accuracies of epochs ``0, 1, ...``.

    One value more than ``accs``: the last is the ``P_up`` the next epoch would use.
    """
    check_fraction("initial", initial)
    seq = [float(initial)]
    for acc in accs:
        seq.append(next_p_up(seq[-1], acc, mode, min_p_up))
    return seq
