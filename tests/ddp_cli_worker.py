"""Run by tests as ``python tests/ddp_cli_worker.py OUT_DIR RECIPE:SCOPE ...``: the CLI under 2-process DDP.

Each ``RECIPE:SCOPE[:OBJECTIVE]`` is one ``lightning-advsel fit`` of the main job's data set and recipe config with
``configs/trainer/ddp_cpu.yaml`` on a tiny schedule, in one launch (a launch costs more than the training here);
with a ``+dashboards`` suffix the main job's third file too (``conftest.MAIN_JOB``: the selection make-up,
minimum-perturbation and figure callbacks, which double a run's time here); with ``+plateau``
``configs/schedules/plateau.yaml`` over two epochs, set to reduce the learning rate after the second whatever its
value (see ``PLATEAU``). Every rank writes the steps it took, the recipe it ran and its scheduler's state to
``OUT_DIR/rank{R}.json``, keyed by the run without the suffix.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from conftest import MAIN_JOB, config_args  # tests/ is on the worker's PYTHONPATH

from lightning_advsel.cli import build_cli

TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--model.init_args.train_attack.steps", "2", "--model.init_args.eval_attack.steps", "2",
        "--data.init_args.batch_size", "32"]
# Two epochs; an improvement must beat the best by more than 1 (an accuracy cannot), so only the first epoch's
# value counts as one and, with no patience, the second epoch halves the learning rate on every rank.
PLATEAU = ["--trainer.max_epochs", "2", "--model.init_args.lr_scheduler.init_args.patience", "0",
           "--model.init_args.lr_scheduler.init_args.threshold_mode", "abs",
           "--model.init_args.lr_scheduler.init_args.threshold", "1.0"]


def main() -> None:
    out = Path(sys.argv[1])
    results, rank = {}, 0
    for arg in sys.argv[2:]:
        run, *suffixes = arg.split("+")
        recipe, scope, *objective = run.split(":")
        configs = (*(MAIN_JOB if "dashboards" in suffixes else MAIN_JOB[:2]),
                   *(["schedules/plateau.yaml"] if "plateau" in suffixes else []))
        cli = build_cli(["fit", *config_args(*configs, "trainer/ddp_cpu.yaml"), *TINY,
                         *(PLATEAU if "plateau" in suffixes else []),
                         "--model.init_args.recipe", recipe, "--model.init_args.selection_scope", scope,
                         "--model.init_args.objective", *(objective or ["ce"]),
                         "--trainer.logger.init_args.save_dir", str(out / run.replace(":", "_"))])
        rank = cli.trainer.global_rank
        results[run] = {"global_step": cli.trainer.global_step, "recipe": cli.model.settings.recipe,
                        "objective": cli.model.settings.objective.name,
                        "world_size": cli.trainer.world_size,
                        "val_acc_clean": float(cli.trainer.callback_metrics["val/acc_clean"]),
                        "val_loss_clean": float(cli.trainer.callback_metrics["val/loss_clean"]),
                        "start_lr": cli.model.lr, "lr": cli.trainer.optimizers[0].param_groups[0]["lr"]}
        scheduler = cli.trainer.lr_scheduler_configs[0].scheduler if cli.trainer.lr_scheduler_configs else None
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            results[run]["plateau"] = {"best": float(scheduler.best), "num_bad_epochs": scheduler.num_bad_epochs}
    (out / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
