"""Every recipe trains through the CLI under 2-process DDP on CPU (gloo), without hanging.

Each launch runs with a timeout, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import MAIN_JOB, REPO, config_args, run_ranks

from lightning_advsel import RECIPES

pytestmark = pytest.mark.slow
# Both scopes are covered; the selection-heavy recipes run under the global one.
RUNS = {"standard": "local", "robust": "global", "ds": "global", "random": "global", "selective": "local",
        "selective_ds": "global"}
# TRADES and MART on pairs, under both scopes.
OBJECTIVE_RUNS = ["ds:global:trades", "selective:local:mart", "robust:local:trades", "random:global:mart"]
# ReduceLROnPlateau (configs/schedules/plateau.yaml) following the validation robust accuracy.
PLATEAU_RUN = "ds:global:ce"


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """Every run in one launch: each rank's results, and what the launch wrote to stderr."""
    out = tmp_path_factory.mktemp("ddp_cli")
    # The main job's dashboard callbacks on the main job's recipe, the part of every run they would double.
    runs = [f"{recipe}:{scope}" + ("+dashboards" if recipe == "ds" else "") for recipe, scope in RUNS.items()]
    runs += [*OBJECTIVE_RUNS, f"{PLATEAU_RUN}+plateau"]
    output = run_ranks([sys.executable, str(REPO / "tests" / "ddp_cli_worker.py"), str(out), *runs], out, 240,
                       "2-rank DDP runs of every recipe")
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)], output


@pytest.fixture(scope="module")
def recipe_runs(launch):
    return launch[0]


def test_every_value_logged_per_epoch_is_synced_over_ranks(launch):
    """Lightning warns for an epoch-level value logged without a sync under DDP: the module's values and the
    main job's callbacks (selection make-up, minimum perturbation) are metrics or reduced before logging."""
    assert "sync_dist=True" not in launch[1]


def test_every_recipe_is_covered():
    assert set(RUNS) == set(RECIPES)


@pytest.mark.parametrize("recipe", list(RUNS))
def test_recipe_trains_on_two_ranks_and_validates(recipe_runs, recipe):
    run = f"{recipe}:{RUNS[recipe]}"
    for rank in recipe_runs:
        assert rank[run]["recipe"] == recipe and rank[run]["world_size"] == 2
        assert rank[run]["global_step"] == 2
        assert 0 <= rank[run]["val_acc_clean"] <= 1
    # val/acc_clean and val/loss_clean are torchmetrics states synced over ranks: both report the same numbers.
    for key in ("val_acc_clean", "val_loss_clean"):
        assert recipe_runs[0][run][key] == recipe_runs[1][run][key]


@pytest.mark.parametrize("run", OBJECTIVE_RUNS)
def test_paired_objectives_train_on_two_ranks(recipe_runs, run):
    recipe, _, objective = run.split(":")
    for rank in recipe_runs:
        assert rank[run]["recipe"] == recipe and rank[run]["objective"] == objective
        assert rank[run]["global_step"] == 2 and rank[run]["world_size"] == 2
    assert recipe_runs[0][run]["val_acc_clean"] == recipe_runs[1][run]["val_acc_clean"]


def test_plateau_schedule_follows_the_synced_metric_so_every_rank_keeps_the_same_learning_rate(recipe_runs):
    """Each rank steps its own ReduceLROnPlateau with the value it logged: the ranks validate on different
    shards, so unless the value is synced their schedulers' bests, and in time their learning rates, drift apart."""
    ranks = [rank[PLATEAU_RUN] for rank in recipe_runs]
    for rank in ranks:
        assert rank["global_step"] == 4
        # The first epoch set the best, the second cannot beat it by the threshold (1) and halved the rate.
        assert rank["lr"] == pytest.approx(rank["start_lr"] / 2)
        assert rank["plateau"]["num_bad_epochs"] == 0  # reset by the reduction
    assert ranks[0]["plateau"] == ranks[1]["plateau"] and ranks[0]["lr"] == ranks[1]["lr"]


def test_console_cli_with_the_ddp_trainer_config_trains_checkpoints_and_draws_the_figures(tmp_path):
    args = [sys.executable, "-m", "lightning_advsel.cli", "fit", *config_args(*MAIN_JOB, "trainer/ddp_cpu.yaml"),
            "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
            "--trainer.enable_progress_bar", "false", "--model.init_args.train_attack.steps", "2",
            "--model.init_args.eval_attack.steps", "2", "--model.init_args.selection_scope", "global",
            "--trainer.logger.init_args.save_dir", str(tmp_path)]
    output = run_ranks(args, tmp_path, 180, "the console CLI with the DDP trainer config")
    assert "val accuracy: clean" in output
    (ckpt,) = tmp_path.rglob("last.ckpt")
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] == 3 and state["hyper_parameters"]["selection_scope"] == "global"
    # The cost totals are summed over the ranks: per step 2 ranks x 64 rows x PGD-2, each rank's 128-row pool
    # scored, and the top half of the 256-row global pool trained on.
    assert state["advsel"]["work"] == {"attack_grad_steps": 3 * 2 * 64 * 2, "forward_rows": 3 * (2 * 128 + 128),
                                       "backward_rows": 3 * 128, "robust_attack_grad_steps": 3 * 2 * 64 * 2,
                                       "robust_forward_rows": 3 * 2 * 64, "robust_backward_rows": 3 * 2 * 64}
    assert "training cost: attack steps 768 (100% of robust training's)" in output
    # The main job's callbacks (make-up, probe, figures) run on both ranks; rank 0 writes the figures.
    assert sorted(p.name for p in tmp_path.rglob("figures/*.png")) == [
        "accuracy.png", "min_perturbation.png", "p_up.png", "selection_makeup.png"]
