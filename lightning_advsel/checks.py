"""Argument checks shared by every constructor of the package.

Each check returns the value it accepted and raises a ``ValueError`` whose message names the argument in
backticks, says what is expected and shows the value received, e.g. ``"`steps` must be an integer >= 1, got 0"``.
A ``bool`` is refused where a number is expected (``True`` is an ``int`` to Python, never a step count).

The command line validates choices itself (they are typed ``Literal[...]``); these checks give a Python caller
the same clear error.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

try:
    from jsonargparse.typing import register_type
except ImportError:  # the command line's parser is not installed: Python use needs no parser registration
    register_type = None


def _is_real(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def check_int(name: str, value: Any, minimum: int, *, optional: bool = False) -> int | None:
    """Return ``value`` if it is an integer of at least ``minimum`` (or ``None``, when ``optional``).

    Raises:
        ValueError: if ``value`` is not an ``int`` (a ``bool`` included) or is below ``minimum``.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}{' or None' if optional else ''}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is ``True`` or ``False``.

    Raises:
        ValueError: for anything else (``1``, ``"yes"``, ``None``).
    """
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be true or false, got {value!r}")
    return value


def check_number(name: str, value: Any, minimum: float, *, strict: bool = False, unit: str | None = None) -> float:
    """Return ``value`` as a float if it is a finite number at least ``minimum`` (above it when ``strict``).

    Args:
        name: the argument, as the caller spells it.
        value: what was passed.
        minimum: the smallest value allowed (or the bound to stay above when ``strict``).
        strict: refuse ``minimum`` itself.
        unit: shown after the expectation, e.g. ``"pixel units"``.

    Raises:
        ValueError: if ``value`` is not a finite ``int`` or ``float`` (a ``bool`` included) or is out of range.
    """
    if not _is_real(value) or not math.isfinite(value) or value < minimum or (strict and value == minimum):
        unit_note = f" ({unit})" if unit else ""
        raise ValueError(f"`{name}` must be a finite number {'>' if strict else '>='} {minimum}{unit_note}, "
                         f"got {value!r}")
    return float(value)


def check_fraction(name: str, value: Any) -> float:
    """Return ``value`` as a float if it is a number in (0, 1].

    Raises:
        ValueError: if ``value`` is not a finite number in (0, 1].
    """
    if not _is_real(value) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a number in (0, 1], got {value!r}")
    if not 0 < value <= 1:
        raise ValueError(f"`{name}` must be in (0, 1], got {value}")
    return float(value)


def check_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    """Return ``value`` if it is one of ``choices`` (a tuple, or a dict whose keys are the choices).

    Raises:
        ValueError: if ``value`` is not among ``choices``; the message lists them.
    """
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {value!r}")
    return value


def check_linf_eps(name: str, eps: float, norm: str) -> None:
    """Refuse an L-inf radius above 1: it covers the whole pixel range [0, 1], so the attack ignores the input.

    Raises:
        ValueError: for ``norm == "linf"`` and ``eps > 1``, naming ``name``.
    """
    if norm == "linf" and eps > 1:
        raise ValueError(f"`{name}` must be <= 1 for the linf norm: pixels lie in [0, 1], got {eps}")


def check_path(name: str, value: Any, expected: str = "a path", *, optional: bool = False) -> str | None:
    """Return ``value`` as a string if it is a non-empty path (``str`` or ``os.PathLike``), or ``None`` if allowed.

    Args:
        name: the argument.
        value: what was passed.
        expected: what the path is for, as the message should say it (``"a folder path"``).
        optional: accept ``None``; the message then says so.

    Raises:
        ValueError: for anything else, an empty string included.
    """
    if value is None and optional:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ValueError(f"`{name}` must be {expected}{' or None' if optional else ''}, got {value!r}")
    return str(value)


_NUMBER = r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
_FRACTION = re.compile(rf"\s*({_NUMBER})\s*(?:/\s*({_NUMBER})\s*)?")


class Pixels(float):
    """A length in pixel units (inputs in [0, 1]), given as a number or as the field writes it: ``8/255``.

    The command line and YAML configs read ``eps: 8/255`` through this type (Python callers write ``8 / 255``).
    Only a number ``a`` or a fraction ``a/b`` of numbers is accepted; the range is the caller's check.

    Raises:
        ValueError: for any other string, or a zero denominator.
    """

    def __new__(cls, value: Any) -> Pixels:
        if isinstance(value, str):
            match = _FRACTION.fullmatch(value)
            if match is None:
                raise ValueError(f"a pixel length must be a number or a fraction such as 8/255, got {value!r}")
            denominator = float(match[2]) if match[2] else 1.0
            if denominator == 0:
                raise ValueError(f"a pixel length cannot divide by zero, got {value!r}")
            value = float(match[1]) / denominator
        return super().__new__(cls, value)


def check_checkpoint_file(path: Any, name: str = "ckpt_path") -> None:
    """Refuse a checkpoint file that is truncated or not a checkpoint, naming the argument ``name`` and the file.

    ``"last"``, ``"best"``, paths that do not exist, remote paths and open files are left to Lightning and torch,
    which resolve or report them. Checkpoints are zip archives (``torch.save``); every member's checksum is read.

    Raises:
        ValueError: naming the file, for a file that is not a complete zip-format PyTorch checkpoint.
    """
    if not isinstance(path, (str, os.PathLike)) or not Path(path).is_file():
        return
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"`{name}` {str(path)!r} is not a readable checkpoint (truncated, or not written by "
                         f"torch.save): {err}") from err
    if damaged is not None:
        raise ValueError(f"`{name}` {str(path)!r} is damaged: its member {damaged!r} fails its checksum")


def plain_pixels(value: Any) -> Any:
    """A :class:`Pixels` from the parser as a plain float (checkpoints and configs hold plain numbers)."""
    return float(value) if isinstance(value, Pixels) else value


if register_type is not None:
    register_type(Pixels, serializer=float, deserializer=Pixels)
