"""benchmarks/batchnorm_statistics.py: recomputed running statistics, their distance, the DS pool, and one run."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import REPO, TinyNet, config_args
from torch import nn

from lightning_advsel.attacks import AttackConfig
from lightning_advsel.cli import build_cli
from lightning_advsel.selection import per_sample_loss

sys.path.insert(0, str(REPO / "benchmarks"))
import batchnorm_statistics as bns  # noqa: E402


def _net() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet(batchnorm=True).eval()


def test_recalibrated_statistics_are_the_average_over_the_inputs_and_the_original_is_untouched():
    model = _net()
    before = model.net[1].running_mean.clone()
    inputs = [torch.rand(8, 1, 8, 8) + shift for shift in (0.0, 1.0, 2.0)]
    new = bns.recalibrated(model, inputs)
    assert not new.training and torch.equal(model.net[1].running_mean, before)
    flat = torch.cat([x.flatten(1) for x in inputs])
    torch.testing.assert_close(new.net[1].running_mean, flat.mean(0))  # equal batches: the mean of batch means
    unbiased_batch_vars = torch.stack([x.flatten(1).var(0) for x in inputs])
    torch.testing.assert_close(new.net[1].running_var, unbiased_batch_vars.mean(0))


def test_distance_is_zero_to_itself_and_counts_a_shift_in_reference_stds():
    model = _net()
    reference = bns.recalibrated(model, [torch.rand(64, 1, 8, 8)])
    assert bns.distance(reference, reference) == (0.0, 0.0)
    shifted = bns.recalibrated(model, [torch.rand(64, 1, 8, 8)])
    with torch.no_grad():
        shifted.net[1].running_mean.copy_(reference.net[1].running_mean
                                          + 2 * (reference.net[1].running_var + reference.net[1].eps).sqrt())
        shifted.net[1].running_var.copy_(reference.net[1].running_var)
    shift, ratio = bns.distance(shifted, reference)
    assert abs(shift - 2.0) < 1e-5 and ratio < 1e-6


def test_the_selected_rows_are_the_highest_loss_half_of_each_pool_and_their_adversarial_share_is_counted():
    model = _net()
    batches = [(torch.rand(10, 1, 8, 8), torch.randint(0, 10, (10,))) for _ in range(2)]
    attack = AttackConfig(eps=0.3, alpha=0.1, steps=3, mode="train")
    all_rows, selected, share = bns.pools(model, attack, batches, p_up=0.5, seed=0)
    running = model.net[1].running_mean.clone()
    for (x, y), pool, chosen in zip(batches, all_rows, selected, strict=True):
        assert pool.shape[0] == 20 and torch.equal(pool[:10], x) and (pool[10:] - x).abs().max() <= 0.3 + 1e-6
        assert chosen.shape[0] == 10
        with torch.no_grad(), bns.model_mode(model, "train"):
            scores = per_sample_loss(model(pool), torch.cat([y, y]))
        kept = torch.tensor([any(torch.equal(row, c) for c in chosen) for row in pool])
        assert scores[kept].min() >= scores[~kept].max()
    assert torch.equal(model.net[1].running_mean, running)  # scoring and attack leave the statistics
    assert 0.0 <= share <= 1.0
    _, _, half_adversarial = bns.pools(model, attack, batches, p_up=1.0, seed=0)
    assert half_adversarial == 0.5


def test_the_script_prints_one_row_per_statistics_variant_for_a_checkpoint_the_command_line_wrote(tmp_path, capsys):
    cli = build_cli(["fit", *config_args("digits/base.yaml", "recipes/ds.yaml"),
                     "--model.init_args.model.init_args.batch_norm", "true",
                     "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                     "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
                     "--model.init_args.train_attack.steps", "2", "--model.init_args.eval_attack.steps", "2",
                     "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
                     "--trainer.logger.init_args.save_dir", str(tmp_path)], run=True)
    ckpt = next(tmp_path.rglob("checkpoints/last.ckpt"))
    assert cli.trainer.current_epoch == 1
    capsys.readouterr()
    bns.main([str(ckpt), "--batches", "2", "--images", "40", "--no-autoattack"])
    out = capsys.readouterr().out
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row[0] for row in rows[1:]] == ["as trained", "clean", "pool", "selected"]
    assert all(len(row) == len(rows[0]) == 7 for row in rows)
    assert rows[2][5:7] == ["0.000", "0.000"]  # the clean statistics' distance from themselves
    assert "40 test images" in out and "statistics over 2 training batches" in out
    # A bad argument is refused by name before any checkpoint is read.
    with pytest.raises(SystemExit) as refused:
        bns.main([str(ckpt), "--batches", "0"])
    assert refused.value.code != 0 and "--batches must be >= 1, got 0" in capsys.readouterr().err
