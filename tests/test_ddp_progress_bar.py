"""Distributed training as users run it: Lightning's defaults on, the progress bar drawn by rank 0 only.

Rank 0's bar, and any callback that runs on rank 0 alone, reads the trainer's metrics, which syncs the logged
values over ranks: a collective that the other ranks make later. These tests hold that no collective of the module
or its callbacks falls out of step with them (``lightning_advsel.distributed.settle_logged_values``). A failure
shows each rank's error (``conftest.run_ranks``); a hang is killed at its timeout and fails the same way.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_ranks

pytestmark = pytest.mark.slow
FAMILIES = ("robust", "selective_margin", "ds_dashboards")


def manual_ddp_command() -> list[str]:
    """The DDP command for the digits main job on the manual's page "Distributed training", word for word."""
    text = (REPO / "docs" / "distributed.md").read_text()
    (line,) = {m.group(0) for m in re.finditer(r"^lightning-advsel fit .*configs/trainer/ddp_cpu\.yaml$", text, re.M)}
    return shlex.split(line)


def test_the_manuals_ddp_command_trains_two_full_epochs_with_the_default_progress_bar(tmp_path):
    words = manual_ddp_command()
    assert words[:2] == ["lightning-advsel", "fit"] and "--trainer.enable_progress_bar" not in words
    script = Path(sys.executable).parent / words[0]  # the console script this environment installed
    output = run_ranks([str(script), *words[1:], "--trainer.max_epochs", "2"], tmp_path, 300,
                       "the manual's DDP command")
    assert "val accuracy: clean" in output and "training cost:" in output
    # Rank 0's bar finished the second epoch: all of its batches (the full training split, shared by 2 ranks).
    done = re.findall(r"Epoch 1: 100%\|[^|]*\| (\d+)/(\d+)", output)
    assert done and done[-1][0] == done[-1][1], "rank 0 drew no finished bar for the second epoch"
    (ckpt,) = tmp_path.rglob("last.ckpt")
    assert torch.load(ckpt, weights_only=True)["global_step"] == 2 * int(done[-1][0])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_bar")
    run_ranks([sys.executable, str(REPO / "tests" / "ddp_progress_bar_worker.py"), str(out)], out, 420,
              "2-rank DDP runs with the progress bar")
    return out, [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_recipe_family_trains_two_epochs_on_two_ranks_with_the_bar_drawn_by_rank_zero(ranks, family):
    _, results = ranks
    for rank in results:
        run = rank[family]
        assert run["world_size"] == 2 and run["global_step"] == 4
        assert run["bar_is_tqdm"]  # Lightning's default bar; it draws on rank 0 only
        # Values synced over ranks read the same on both.
        assert run["metrics"]["val/acc_clean"] == results[0][family]["metrics"]["val/acc_clean"]
        assert run["metrics"]["train/loss_epoch"] == results[0][family]["metrics"]["train/loss_epoch"]


def test_dashboards_callbacks_ran_after_the_rank_zero_reader(ranks):
    _, results = ranks
    for rank in results:
        names = rank["ds_dashboards"]["callbacks"]
        assert names.index("ReadMetricsOnRankZero") < names.index("SelectionMakeup")
        metrics = rank["ds_dashboards"]["metrics"]
        assert metrics["selection/n_clean"] + metrics["selection/n_adv"] > 0
        assert 0 <= metrics["minperturb/median"]
    # Every epoch value is synced (step values stay each rank's own, by design: no collective per step).
    epoch_values = [{k: v for k, v in rank["ds_dashboards"]["metrics"].items() if not k.endswith("_step")}
                    for rank in results]
    assert epoch_values[0] == epoch_values[1]


@pytest.mark.parametrize("stage, prefix", [("validate", "val"), ("test", "test")])
def test_validate_and_test_run_on_two_ranks_with_the_bar(ranks, stage, prefix):
    _, results = ranks
    for rank in results:
        assert rank[stage]["world_size"] == 2 and rank[stage]["bar_is_tqdm"]
        for key in (f"{prefix}/acc_clean", f"{prefix}/acc_robust"):
            assert 0 <= rank[stage]["metrics"][key] <= 1
            assert rank[stage]["metrics"][key] == results[0][stage]["metrics"][key]


def test_a_rank_zero_callback_reading_the_metrics_at_every_epoch_and_stage_end_neither_hangs_nor_crashes(ranks):
    out, _ = ranks
    for run in FAMILIES:
        hooks = [read.split(":")[0] for read in json.loads((out / f"{run}.reads").read_text())]
        assert hooks.count("on_train_epoch_end") == 2, hooks
        assert hooks.count("on_validation_end") == 3, hooks  # the sanity check and two epochs
    for stage, hooks in (("validate", ("on_validation_epoch_end", "on_validation_end")),
                         ("test", ("on_test_epoch_end", "on_test_end"))):
        assert [read.split(":")[0] for read in json.loads((out / f"{stage}.reads").read_text())] == list(hooks)
