"""Run by tests as ``python tests/evaluate_worker.py MARKER PAUSE_AFTER [evaluate's arguments]``:
``lightning-advsel evaluate`` with the test budget of the reference attacks, which after ``PAUSE_AFTER`` finished
batches writes ``MARKER`` and waits to be killed (``PAUSE_AFTER`` 0: no pause)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from autoattack_budget import cut_reference_budget

import lightning_advsel.evaluate_checkpoint as evaluate_checkpoint
from lightning_advsel.cli import main


def pause_after(batches: int, marker: Path) -> None:
    append, written = evaluate_checkpoint._append, []

    def append_then_pause(partial: Path, entry: dict) -> None:
        append(partial, entry)
        written.append(entry["batch"])
        if len(written) == batches:
            marker.write_text(str(entry["batch"]))
            time.sleep(120)

    evaluate_checkpoint._append = append_then_pause


if __name__ == "__main__":
    cut_reference_budget()
    if int(sys.argv[2]):
        pause_after(int(sys.argv[2]), Path(sys.argv[1]))
    main(["evaluate", *sys.argv[3:]])
