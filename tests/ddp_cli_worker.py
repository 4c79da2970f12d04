"""Run by tests as ``python tests/ddp_cli_worker.py OUT_DIR RECIPE:SCOPE ...``: the CLI under 2-process DDP.

Each ``RECIPE:SCOPE[:OBJECTIVE]`` is one ``lightning-advsel fit`` of the main job's data set and recipe config with
``configs/trainer/ddp_cpu.yaml`` on a tiny schedule, in one launch (a launch costs more than the training here);
with a ``+dashboards`` suffix the main job's third file too (``conftest.MAIN_JOB``: the selection make-up,
minimum-perturbation and figure callbacks, which double a run's time here). Every rank writes the steps it took
and the recipe it ran to ``OUT_DIR/rank{R}.json``, keyed by the run without the suffix.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from conftest import MAIN_JOB, config_args  # tests/ is on the worker's PYTHONPATH

from lightning_advsel.cli import build_cli

TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--model.init_args.train_attack.steps", "2", "--model.init_args.eval_attack.steps", "2",
        "--data.init_args.batch_size", "32"]


def main() -> None:
    out = Path(sys.argv[1])
    results, rank = {}, 0
    for arg in sys.argv[2:]:
        run, dashboards = arg.removesuffix("+dashboards"), arg.endswith("+dashboards")
        recipe, scope, *objective = run.split(":")
        configs = MAIN_JOB if dashboards else MAIN_JOB[:2]
        cli = build_cli(["fit", *config_args(*configs, "trainer/ddp_cpu.yaml"), *TINY,
                         "--model.init_args.recipe", recipe, "--model.init_args.selection_scope", scope,
                         "--model.init_args.objective", *(objective or ["ce"]),
                         "--trainer.logger.init_args.save_dir", str(out / run.replace(":", "_"))])
        rank = cli.trainer.global_rank
        results[run] = {"global_step": cli.trainer.global_step, "recipe": cli.model.settings.recipe,
                        "objective": cli.model.settings.objective.name,
                        "world_size": cli.trainer.world_size,
                        "val_acc_clean": float(cli.trainer.callback_metrics["val/acc_clean"]),
                        "val_loss_clean": float(cli.trainer.callback_metrics["val/loss_clean"])}
    (out / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
