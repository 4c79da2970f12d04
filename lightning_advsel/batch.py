"""The one rule for reading a batch: inputs, labels, and whatever else the data module put in it.

A batch is a sequence ``(x, y, *extra)`` (inputs and labels first, then anything else: dataset indices, sample
weights, ...) or a mapping such as ``{"image": x, "label": y, "index": i}``, read with ``keys`` naming its input
and label entries (the module's ``batch_keys``). Our data modules yield ``(x, y)``, or ``(x, y, index)`` when
asked for dataset indices (``return_index=True``), where ``index`` is each row's position in the data module's
training (or validation, test) set; a mapping carries them under :data:`INDEX_KEY`. Every part of the package
that reads a batch (the module's steps, the callbacks) goes through :func:`unpack`, so a new batch format is
taught in one place.

A mapping batch needs its keys named: data sets spell them differently (``image``/``label``, ``img``,
``pixel_values``/``labels``, ``input``/``target``), and a guessed key could train on the wrong entry without a
word.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

INDEX_KEY = "index"  # the entry of a mapping batch that holds its rows' dataset indices


def check_keys(batch_keys: Any) -> tuple[str, str] | None:
    """Return ``batch_keys`` as a tuple ``(input key, label key)``, or ``None``.

    Raises:
        ValueError: unless ``batch_keys`` is ``None`` or two different strings.
    """
    if batch_keys is None:
        return None
    if (isinstance(batch_keys, (str, bytes)) or not isinstance(batch_keys, Sequence) or len(batch_keys) != 2
            or not all(isinstance(k, str) for k in batch_keys) or batch_keys[0] == batch_keys[1]):
        raise ValueError(f"`batch_keys` must be two different keys (input key, label key) of a mapping batch, "
                         f"e.g. ('image', 'label'), got {batch_keys!r}")
    return tuple(batch_keys)


def unpack(batch: Any, keys: tuple[str, str] | None = None) -> tuple[Tensor, Tensor, tuple[Any, ...] | dict[str, Any]]:
    """Split a batch into inputs ``x``, labels ``y`` and the remaining fields, passed through untouched.

    Args:
        batch: a sequence ``(x, y, *extra)``, or a mapping holding ``x`` and ``y`` under ``keys``.
        keys: ``(input key, label key)`` of a mapping batch (the module's ``batch_keys``); a sequence is read
            by position whatever ``keys`` is.

    Returns:
        ``(x, y, extra)`` with ``extra`` the (possibly empty) tuple of a sequence's other fields, or the dict of
        a mapping's other entries.

    Raises:
        ValueError: for a mapping batch when ``keys`` is ``None`` or names an entry the batch lacks (the message
            lists the keys present), or a batch that is neither a mapping nor a sequence of at least an input
            tensor and a label tensor.
    """
    if isinstance(batch, Mapping):
        present = list(batch)
        if keys is None:
            raise ValueError(f"a mapping batch needs `batch_keys`=(input key, label key) to say which entries are "
                             f"inputs and labels; the batch has keys {present}")
        missing = [k for k in keys if k not in batch]
        if missing:
            raise ValueError(f"`batch_keys`={keys!r} names {missing} that the batch lacks; the batch has keys "
                             f"{present}")
        x, y = batch[keys[0]], batch[keys[1]]
        extra: tuple[Any, ...] | dict[str, Any] = {k: v for k, v in batch.items() if k not in keys}
    elif not isinstance(batch, Sequence) or isinstance(batch, (str, bytes)) or len(batch) < 2:
        raise ValueError(
            f"a batch must be a sequence (x, y, *extra) of inputs and labels or a mapping read with `batch_keys`, "
            f"got {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, Sequence) else "")
        )
    else:
        x, y, *rest = batch
        extra = tuple(rest)
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ValueError(
            f"a batch's inputs and labels must be tensors, got ({type(x).__name__}, {type(y).__name__}, ...)"
        )
    return x, y, extra


def inputs_and_labels(batch: Any, keys: tuple[str, str] | None = None) -> tuple[Tensor, Tensor | None]:
    """A prediction batch's inputs and labels: read as :func:`unpack` does, or inputs alone (labels ``None``).

    Inputs alone are a tensor ``x``, a sequence ``(x,)``, or a mapping without the label key of ``keys``.

    Raises:
        ValueError: as :func:`unpack`, for a batch that holds no input tensor.
    """
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) == 1 \
            and isinstance(batch[0], Tensor):
        return batch[0], None
    if isinstance(batch, Mapping) and keys is not None and keys[1] not in batch and keys[0] in batch:
        return batch[keys[0]], None
    x, y, _ = unpack(batch, keys)
    return x, y


def index_of(batch: Any, keys: tuple[str, str] | None = None) -> Tensor | None:
    """The dataset indices of a batch's rows, else ``None``.

    They are the third field of a sequence ``(x, y, index, ...)`` or a mapping's :data:`INDEX_KEY` entry, when
    that is a 1-D integer tensor (a float third field, such as sample weights, is not an index).
    """
    return index_in(unpack(batch, keys)[2])


def index_in(extra: tuple[Any, ...] | dict[str, Any]) -> Tensor | None:
    """:func:`index_of` from the fields :func:`unpack` left over (``extra``), without reading the batch again."""
    index = extra.get(INDEX_KEY) if isinstance(extra, dict) else (extra[0] if extra else None)
    if isinstance(index, Tensor) and not index.dtype.is_floating_point and index.ndim == 1:
        return index
    return None
