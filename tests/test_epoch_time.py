"""benchmarks/epoch_time.py: a few timed batches of a config, extrapolated to a full epoch (digits only)."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO, digits

sys.path.insert(0, str(REPO / "benchmarks"))
from epoch_time import main, measure, per_batch_seconds  # noqa: E402


def test_per_batch_time_leaves_out_the_first_batch_when_there_are_more():
    assert per_batch_seconds([10.0, 15.0, 16.0, 18.0]) == pytest.approx(1.5)  # (1 + 2) / 2; 5 s warm-up dropped
    assert per_batch_seconds([10.0, 15.0]) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="no batch was timed"):
        per_batch_seconds([10.0])


def test_bad_batch_counts_are_refused_before_anything_runs():
    with pytest.raises(ValueError, match=r"`train_batches` must be an integer >= 1, got 0"):
        measure(["--config", "nowhere.yaml"], 0, 1)


def test_epoch_time_of_a_digits_config_extrapolates_to_the_full_loaders(capsys):
    rows = main([*digits("robust"), "--train-batches", "3",
                 "--val-batches", "1", "--model.init_args.train_attack.steps", "1",
                 "--model.init_args.eval_attack.steps", "1", "--trainer.accelerator", "cpu"])
    train, val, epoch = rows
    # 1257 training and 270 validation digits in batches of 64.
    assert (train["phase"], train["timed"], train["batches"]) == ("train", 3, 20)
    assert (val["phase"], val["timed"], val["batches"]) == ("validation", 1, 5)  # 1 means one batch, not 100%
    for row in (train, val):
        assert row["s_per_batch"] > 0 and row["s_per_epoch"] == pytest.approx(row["s_per_batch"] * row["batches"])
    assert epoch["s_per_epoch"] == pytest.approx(train["s_per_epoch"] + val["s_per_epoch"])
    out = capsys.readouterr().out
    assert "| train | 3 |" in out and "| validation | 1 |" in out and "min) |" in out and "device: cpu" in out
