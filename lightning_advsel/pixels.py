"""Inputs as pixels: every attack sees pixels in [0, 1], whatever the data module yields.

A data module may yield normalized inputs ``(pixels - mean) / std`` for a network that expects them; the module's
``input_normalization`` names those statistics (:func:`as_normalization`). Each batch is then mapped back to
pixels (:func:`read_pixels`), attacked there, so every ``eps`` stays in pixel units, and given to the network
through :class:`~lightning_advsel.models.Normalize` again (:func:`pixel_model`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from lightning_advsel.batch import inputs_and_labels, unpack
from lightning_advsel.models import Normalize


def as_normalization(value: Any) -> Normalize | None:
    """``input_normalization`` as a :class:`Normalize`, whose checks on the statistics it reports under its name.

    Raises:
        ValueError: unless ``value`` is ``None`` or a pair ``(mean, std)`` of lists that :class:`Normalize` takes.
    """
    if value is None:
        return None
    expected = "a pair (mean, std) of per-channel lists in pixel units, e.g. [[0.49, 0.48, 0.45], [0.25, 0.24, 0.26]]"
    if (isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2
            or not all(isinstance(v, Sequence) and not isinstance(v, (str, bytes)) for v in value)):
        raise ValueError(f"`input_normalization` must be {expected}, got {value!r}")
    mean, std = value
    try:
        return Normalize(mean, std)
    except ValueError as err:
        raise ValueError(f"`input_normalization` (mean, std): {err}") from err


def pixel_model(model: nn.Module, normalization: Normalize | None) -> nn.Module:
    """The classifier on pixels: ``model``, after ``normalization`` when there is one (a new ``nn.Sequential``
    that holds no weights of its own)."""
    return model if normalization is None else nn.Sequential(normalization, model)


def to_pixels(x: Tensor, normalization: Normalize | None) -> Tensor:
    """A batch's inputs as pixels: unchanged, or mapped back through ``normalization``."""
    return x if normalization is None else normalization.inverse(x)


def read_pixels(batch: Any, keys: tuple[str, str] | None, normalization: Normalize | None,
                ) -> tuple[Tensor, Tensor, tuple[Any, ...] | dict[str, Any]]:
    """``(x, y, extra)`` of a batch (:func:`~lightning_advsel.batch.unpack` with ``keys``), ``x`` in pixels."""
    x, y, extra = unpack(batch, keys)
    return to_pixels(x, normalization), y, extra


def read_pixel_inputs(batch: Any, keys: tuple[str, str] | None, normalization: Normalize | None,
                      ) -> tuple[Tensor, Tensor | None]:
    """``(x, y)`` of a batch that may hold inputs alone (:func:`~lightning_advsel.batch.inputs_and_labels`),
    ``x`` in pixels and ``y`` ``None`` without labels."""
    x, y = inputs_and_labels(batch, keys)
    return to_pixels(x, normalization), y
