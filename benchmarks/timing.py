"""Wall time per training step of every row of a ``reproduce.py`` suite, interleaved, on an idle machine.

Accuracy records may be made while other work runs (CPU training is deterministic); time may not. This
script builds every row of a suite (seed 0) through the command line's parser, exactly as ``reproduce.py``
does, then trains them in rounds: each round runs ``--chunk`` training steps of every row in turn, so a
drift of the machine's speed touches every row alike. Per step it records the time from Lightning's
``on_train_batch_start`` to ``on_train_batch_end`` (data loading, attack, selection, update; no validation)
and reports the median per row and its ratio to ``robust``. The result goes to
``<records>/<suite>/timing.json``, which ``report.py`` reads.

    python benchmarks/timing.py mnist --data-dir /path/to/data --rounds 5 --chunk 40
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from reproduce import RECORDS, _config_args, suites


class StepTimer(Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.seconds.append(time.perf_counter() - self._t0)


def main(argv: list[str] | None = None) -> None:
    from lightning_advsel.cli import build_cli

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=40, help="training steps of a row per round")
    parser.add_argument("--records", type=Path, default=RECORDS)
    args = parser.parse_args(argv)
    suite = suites(str(Path(args.data_dir).resolve()))[args.suite]
    rows = {}
    for run in suite.rows:
        # A row with a profiling run first (stability) trains the robust recipe twice: report.py derives its
        # time from robust's steps instead of timing a step that needs the profile's output.
        if run.seed != 0 or run.name in rows or run.pre:
            continue
        cli = build_cli([*_config_args(suite, run.config), *suite.overrides, *run.extra, "--trainer.logger", "false",
                         "--trainer.enable_progress_bar", "false",
                         "--trainer.accelerator", "cpu"], run=False)
        cli.datamodule.setup("fit")
        rows[run.name] = (cli.model, cli.datamodule, StepTimer())
    for _ in range(args.rounds):
        for model, data, timer in rows.values():
            trainer = L.Trainer(max_epochs=1, limit_train_batches=args.chunk, limit_val_batches=0, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                accelerator="cpu", devices=1, callbacks=[timer])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.fit(model, datamodule=data)
    per_step = {name: statistics.median(timer.seconds[1:]) for name, (_, _, timer) in rows.items()}
    robust = per_step.get("robust")
    print("| recipe | steps timed | median s / step | relative to robust |\n| --- | ---: | ---: | ---: |")
    for name, (_, _, timer) in rows.items():
        rel = f"{per_step[name] / robust:.3f}" if robust else ""
        print(f"| {name} | {len(timer.seconds)} | {per_step[name]:.4f} | {rel} |")
    out = args.records / suite.name / "timing.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "suite": suite.name, "seconds_per_step": per_step,
        "command": f"`python benchmarks/timing.py {args.suite} --rounds {args.rounds} --chunk {args.chunk}`",
        "machine": f"{platform.processor() or platform.machine()}, idle",
    }, indent=1))


if __name__ == "__main__":
    main()
