"""A callback for the resume test: at a given step it drops a marker file and waits to be killed."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L


class PauseAt(L.Callback):
    """After optimizer step ``step``, write ``marker`` and sleep ``seconds`` (the test SIGKILLs the process)."""

    def __init__(self, step: int, marker: str, seconds: float = 120.0) -> None:
        self.step = step
        self.marker = Path(marker)
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.step:
            self.marker.write_text(str(batch_idx))
            time.sleep(self.seconds)
