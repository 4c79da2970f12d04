"""How long one epoch of a config takes on this machine, extrapolated from a few timed batches.

Runs ``lightning-advsel fit`` on the given config for one epoch limited to ``--train-batches`` training and
``--val-batches`` validation batches (logs and checkpoints go to a temporary folder), times every batch, and
multiplies the steady per-batch time (the first batch of each phase, which pays one-off costs, is left out)
by the number of batches of a full epoch. Every argument it does not know is passed to the CLI, so
``--config`` (repeatable), ``--data.init_args.data_dir`` and any other override work as with ``fit``::

    python benchmarks/epoch_time.py --config configs/mnist/base.yaml --config configs/recipes/robust.yaml \\
        --data.init_args.data_dir ../shared/data --train-batches 30 --val-batches 5

Not counted: callbacks that run at the end of an epoch (minimum perturbation, figures) and checkpoint writes.
On a GPU, each time is read after ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_advsel.cli import build_cli


class BatchTimer(Callback):
    """Records the time at the end of every training and validation batch, and at each phase's start."""

    def __init__(self) -> None:
        self.marks: dict[str, list[float]] = {"train": [], "validation": []}

    @staticmethod
    def _now(trainer: L.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.marks["train"] = [self._now(trainer)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.marks["train"].append(self._now(trainer))

    def on_validation_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        if not trainer.sanity_checking:
            self.marks["validation"] = [self._now(trainer)]

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        if not trainer.sanity_checking:
            self.marks["validation"].append(self._now(trainer))


def per_batch_seconds(marks: list[float]) -> float:
    """Mean time of a batch after the first (the first only when there is one batch); ``marks`` starts at 0."""
    steps = [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]
    if not steps:
        raise ValueError("no batch was timed")
    steady = steps[1:] or steps
    return sum(steady) / len(steady)


def measure(cli_args: list[str], train_batches: int, val_batches: int) -> list[dict]:
    """Time ``train_batches`` training and ``val_batches`` validation batches of the configured run.

    Args:
        cli_args: arguments of ``lightning-advsel fit`` (``--config ...`` and overrides).
        train_batches: training batches to run (the first is not timed when there are more).
        val_batches: validation batches to run (likewise).

    Returns:
        One row per phase (``train``, ``validation``) and a total row ``epoch``: batches timed, seconds per
        batch, batches per full epoch, extrapolated seconds per epoch, and the device.

    Raises:
        ValueError: if a batch count is below 1.
    """
    for name, value in (("train_batches", train_batches), ("val_batches", val_batches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
    timer = BatchTimer()
    with tempfile.TemporaryDirectory() as tmp:
        cli = build_cli([*cli_args, "--trainer.max_epochs", "1", "--trainer.num_sanity_val_steps", "0",
                         "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", tmp,
                         "--trainer.logger.init_args.save_dir", tmp], run=False)
        # Counts of batches, set on the trainer after the configs are parsed.
        cli.trainer.limit_train_batches, cli.trainer.limit_val_batches = train_batches, val_batches
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        full = {"train": len(cli.datamodule.train_dataloader()), "validation": len(cli.datamodule.val_dataloader())}
        device = cli.trainer.strategy.root_device
    rows = []
    for phase in ("train", "validation"):
        seconds = per_batch_seconds(timer.marks[phase])
        rows.append({"phase": phase, "timed": len(timer.marks[phase]) - 1, "s_per_batch": seconds,
                     "batches": full[phase], "s_per_epoch": seconds * full[phase]})
    rows.append({"phase": "epoch", "timed": None, "s_per_batch": None, "batches": None,
                 "s_per_epoch": sum(r["s_per_epoch"] for r in rows)})
    for row in rows:
        row["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows of :func:`measure` as a Markdown table; the epoch total also in minutes."""
    lines = ["| phase | batches timed | s / batch | batches / epoch | s / epoch |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["phase"] == "epoch":
            lines.append(f"| epoch | | | | {r['s_per_epoch']:.0f} ({r['s_per_epoch'] / 60:.1f} min) |")
        else:
            lines.append(f"| {r['phase']} | {r['timed']} | {r['s_per_batch']:.3f} | {r['batches']} | "
                         f"{r['s_per_epoch']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-batches", type=int, default=20, help="training batches to time")
    parser.add_argument("--val-batches", type=int, default=5, help="validation batches to time")
    args, cli_args = parser.parse_known_args(argv)
    rows = measure(cli_args, args.train_batches, args.val_batches)
    print(f"{' '.join(cli_args)}\ndevice: {rows[0]['device']}, {torch.get_num_threads()} CPU threads\n"
          f"{format_table(rows)}")
    return rows


if __name__ == "__main__":
    main()
