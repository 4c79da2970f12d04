"""Per-epoch records that a callback keeps for figures and saves in checkpoints."""

from __future__ import annotations

from typing import Any


class EpochHistory:
    """Mixin: ``history`` is a list of plain dicts, one per recorded epoch, kept in the checkpoint state.

    A resumed run that repeats epochs past its checkpoint replaces their rows instead of duplicating them.
    """

    history: list[dict[str, Any]]

    def record(self, epoch: int, row: dict[str, Any]) -> None:
        self.history = [h for h in self.history if h["epoch"] < epoch]
        self.history.append({"epoch": epoch, **row})

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
