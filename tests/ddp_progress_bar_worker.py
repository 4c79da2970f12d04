"""Run by ``tests/test_ddp_progress_bar.py`` as ``python tests/ddp_progress_bar_worker.py OUT_DIR``: the CLI under
2-process DDP (``configs/trainer/ddp_cpu.yaml``; Lightning starts rank 1 by running this script again) with
Lightning's defaults on, the progress bar included, as users run it.

One fit per recipe family (robust, selective margin, ds with the dashboards' callbacks), two short epochs each,
then ``validate`` and ``test`` of the ds run's last checkpoint. Each run has a rank-zero-only callback that reads
the trainer's metrics at every epoch and stage end (``rank_zero_reader.ReadMetricsOnRankZero``), placed before the
dashboards' callbacks, so that its reads come before their collectives. Every rank writes what it ran to
``OUT_DIR/rank{R}.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from conftest import config_args  # tests/ is on the worker's PYTHONPATH
from lightning.pytorch.callbacks import TQDMProgressBar

from lightning_advsel.cli import build_cli

SHORT = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
         "--trainer.limit_test_batches", "2", "--model.init_args.train_attack.steps", "1",
         "--model.init_args.eval_attack.steps", "2", "--data.init_args.batch_size", "32"]
FITS = {"robust": "recipes/robust.yaml", "selective_margin": "recipes/selective_margin.yaml",
        "ds_dashboards": "recipes/ds.yaml"}


def reader(out: Path, run: str) -> list[str]:
    spec = {"class_path": "rank_zero_reader.ReadMetricsOnRankZero", "init_args": {"path": str(out / f"{run}.reads")}}
    return [f"--trainer.callbacks+={json.dumps(spec)}"]


def record(cli, out: Path, run: str) -> dict:  # noqa: ANN001 - an AdvSelCLI
    trainer = cli.trainer
    bar = trainer.progress_bar_callback
    return {"global_step": trainer.global_step, "world_size": trainer.world_size,
            "bar": type(bar).__name__ if bar is not None else None,
            "bar_is_tqdm": isinstance(bar, TQDMProgressBar),
            "callbacks": [type(c).__name__ for c in trainer.callbacks],
            "metrics": {key: float(value) for key, value in trainer.callback_metrics.items()},
            "log_dir": str(out / run)}


def main() -> None:
    out = Path(sys.argv[1])
    results, rank = {}, 0
    for run, recipe in FITS.items():
        dashboards = ["callbacks/dashboards.yaml"] if "dashboards" in run else []
        cli = build_cli(["fit", *config_args("digits/base.yaml", recipe), *reader(out, run),
                         *config_args(*dashboards, "trainer/ddp_cpu.yaml"), *SHORT,
                         "--trainer.logger.init_args.save_dir", str(out / run)])
        rank = cli.trainer.global_rank
        results[run] = record(cli, out, run)
    (ckpt,) = (out / "ds_dashboards").rglob("last.ckpt")
    for stage in ("validate", "test"):
        cli = build_cli([stage, *config_args("digits/base.yaml", "recipes/ds.yaml"), *reader(out, stage),
                         *config_args("trainer/ddp_cpu.yaml"), *SHORT, "--ckpt_path", str(ckpt),
                         "--trainer.logger.init_args.save_dir", str(out / stage)])
        results[stage] = record(cli, out, stage)
    (out / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
