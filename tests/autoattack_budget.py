"""A smaller budget for the reference AutoAttack in tests: its 100 iterations and Square's 5000 queries take
seconds per image on a slow CPU. The attacks, their order and their seeding stay the reference's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyautoattack.autoattack as reference

ITERATIONS = 5  # APGD-CE, APGD-T (per target class) and FAB-T
QUERIES = 50  # Square


def _fewer_iterations(base: type) -> type:
    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: N807
        base.__init__(self, *args, **{**kwargs, "n_iter": ITERATIONS})

    return type(base.__name__, (base,), {"__init__": __init__})


def cut_reference_budget(setattr_: Callable[[Any, str, Any], None] = setattr) -> None:
    """Build the reference's attacks with ``ITERATIONS`` iterations and Square with ``QUERIES`` queries, through
    ``setattr_`` (pytest's ``monkeypatch.setattr`` undoes it after the test)."""
    for name in ("APGDAttack", "APGDAttack_targeted", "FABAttack_PT"):
        setattr_(reference, name, _fewer_iterations(getattr(reference, name)))
    set_version = reference.AutoAttack._set_version

    def _set_version(self: Any, version: str = "standard") -> None:
        set_version(self, version)
        self.square.n_queries = QUERIES

    setattr_(reference.AutoAttack, "_set_version", _set_version)
