"""The README's main job meets its promise: clean >= 0.95 and PGD-20 robust >= 0.80 on digits at eps 0.1."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import MAIN_JOB, config_args

from lightning_advsel.cli import build_cli


@pytest.mark.slow
def test_main_job_reaches_the_promised_clean_and_robust_accuracy(tmp_path, capsys):
    cli = build_cli(["fit", *config_args(*MAIN_JOB),
                     "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path)])
    metrics = cli.trainer.callback_metrics
    assert cli.model.eval_attack.steps == 20 and cli.model.eval_attack.eps == pytest.approx(0.1)
    assert float(metrics["val/acc_clean"]) >= 0.95
    assert float(metrics["val/acc_robust"]) >= 0.80
    assert "val accuracy: clean" in capsys.readouterr().out
    # The dashboard of the main job: make-up and minimum-perturbation scalars, and the four figures.
    for key in ("train/selected_adv_frac", "minperturb/median", "minperturb/selected_min_adv_frac"):
        assert 0 <= float(metrics[key]) <= 1
    for name in ("p_up", "selection_makeup", "min_perturbation", "accuracy"):
        assert (Path(cli.trainer.log_dir) / "figures" / f"{name}.png").stat().st_size > 0
