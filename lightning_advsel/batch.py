"""The one rule for reading a batch: inputs, labels, and whatever else the data module put in it.

Data modules yield ``(x, y)``, or ``(x, y, index)`` when asked for dataset indices (``return_index=True``),
where ``index`` is each row's position in the data module's training (or validation, test) set. Every part of
the package that reads a batch (the module's steps, the callbacks) goes through :func:`unpack`, so a new
batch format is taught in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor


def unpack(batch: Any) -> tuple[Tensor, Tensor, tuple[Any, ...]]:
    """Split a batch into inputs ``x``, labels ``y`` and the remaining fields, passed through untouched.

    Args:
        batch: a sequence ``(x, y, *extra)``.

    Returns:
        ``(x, y, extra)`` with ``extra`` the (possibly empty) tuple of the other fields.

    Raises:
        ValueError: for a batch that is not a sequence of at least an input tensor and a label tensor.
    """
    if not isinstance(batch, Sequence) or isinstance(batch, (str, bytes)) or len(batch) < 2:
        raise ValueError(
            f"a batch must be a sequence (x, y, *extra) of inputs and labels, got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, Sequence) else "")
        )
    x, y, *extra = batch
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ValueError(
            f"a batch must start with an input tensor and a label tensor, got ({type(x).__name__}, "
            f"{type(y).__name__}, ...)"
        )
    return x, y, tuple(extra)


def index_of(batch: Any) -> Tensor | None:
    """The dataset indices of a batch's rows: the third field of ``(x, y, index)``, else ``None``."""
    _, _, extra = unpack(batch)
    if extra and isinstance(extra[0], Tensor) and not extra[0].dtype.is_floating_point and extra[0].ndim == 1:
        return extra[0]
    return None
