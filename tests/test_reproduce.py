"""The real-data benchmark runs end to end on a tiny budget: records through the CLI, resume, the report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import reproduce  # noqa: E402


@pytest.mark.slow
def test_benchmark_writes_one_record_per_run_skips_it_on_rerun_and_reports_from_the_records(tmp_path, monkeypatch,
                                                                                              capsys):
    # The script's commands in this process; each row still trains in a process of its own, as in a real matrix.
    monkeypatch.chdir(tmp_path)
    records, runs = tmp_path / "records", tmp_path / "runs"
    common = ("--records", str(records), "--runs", str(runs))
    reproduce.main(["run", "tiny", "--only", "robust", "ds", *common])
    assert "[fail]" not in capsys.readouterr().out
    for row in ("robust", "ds"):
        rec = json.loads((records / "tiny" / f"{row}-s0.json").read_text())
        assert rec["row"] == row and rec["seed"] == 0 and rec["resolved_config"]["model"]["init_args"]["recipe"] == row
        assert rec["epochs"] == 2 and rec["steps"] == 4 and len(rec["flops_per_epoch"]) == 2
        assert rec["train_flops"] == sum(rec["flops_per_epoch"]) > 0
        assert rec["test"]["pgd20"]["attack"].startswith("PGD-20") and rec["test"]["pgd20"]["images"] == 16
        assert rec["test"]["aa_apgd"]["attack"].startswith("AutoAttack apgd")
        # Robust accuracy counts images classified correctly after the attack: at most the clean accuracy.
        assert 0 <= rec["test"]["aa_apgd"]["robust"] <= rec["test"]["aa_apgd"]["clean"]
    ds = json.loads((records / "tiny" / "ds-s0.json").read_text())
    robust = json.loads((records / "tiny" / "robust-s0.json").read_text())
    assert ds["train_flops"] > robust["train_flops"]  # the DS pool adds a scoring pass over 2b' rows

    # The dashboards' PNGs (the DS paper's Figs. 7 and 8) are copied beside the records and listed in the record.
    assert "tiny_ds-s0_selection_makeup.png" in ds["figures"] and robust["figures"] == []
    assert all((tmp_path / "figures" / name).stat().st_size > 0 for name in ds["figures"])

    reproduce.main(["run", "tiny", "--only", "robust", *common])
    assert "[skip] tiny/robust-s0: record exists" in capsys.readouterr().out

    out = tmp_path / "RESULTS.md"
    reproduce.main(["report", "--records", str(records), "--out", str(out)])
    text = out.read_text()
    assert "## tiny" in text and "| robust | 1 |" in text and "| ds | 1 |" in text
    assert "| 1.000 |" in text  # robust's FLOPs relative to itself
    assert (tmp_path / "figures" / "tiny_pareto.png").stat().st_size > 0
    assert "](figures/tiny_ds-s0_selection_makeup.png)" in text
    assert "Runs of the matrix without a record (not run): stability-s0." in text


def test_report_times_a_row_by_its_steps_and_the_stability_row_as_both_of_its_robust_runs():
    from report import _row_time

    rows = {"robust": [{"steps": 100}], "ds": [{"steps": 100}], "stability": [{"steps": 50, "profile_steps": 100}]}
    timing = {"seconds_per_step": {"robust": 2.0, "ds": 2.5}}
    assert _row_time("ds", rows["ds"], rows, timing) == 1.25
    assert _row_time("stability", rows["stability"], rows, timing) == 1.5  # 100 + 50 robust steps
    assert _row_time("standard", [{"steps": 100}], rows, timing) is None  # not timed
    assert _row_time("ds", rows["ds"], rows, None) is None


def test_report_lists_each_seed_of_the_rows_run_at_several_in_seed_order():
    from report import seed_table

    def rec(seed: int, aa: float) -> dict:
        return {"seed": seed, "test": {"pgd20": {"clean": 0.5, "robust": 0.3}, "aa_apgd": {"robust": aa}}}

    rows = {"ds": [rec(1, 0.1), rec(0, 0.2)], "robust": [rec(0, 0.25), rec(1, 0.092)], "standard": [rec(0, 0.1)]}
    lines = seed_table(rows)
    assert lines[2:] == ["| robust | 0 | 50.0 | 30.0 | 25.0 |", "| robust | 1 | 50.0 | 30.0 | 9.2 |",
                         "| ds | 0 | 50.0 | 30.0 | 20.0 |", "| ds | 1 | 50.0 | 30.0 | 10.0 |"]
    assert seed_table({"standard": [rec(0, 0.1)]}) == []  # one seed: the main table says it all


def test_every_row_of_every_suite_resolves_through_the_cli(tmp_path):
    """A suite's overrides are CLI arguments: a typo or a renamed option would only fail hours into a matrix."""
    import yaml

    from lightning_advsel.cli import build_cli

    resolved = set()
    for suite in reproduce.suites(str(tmp_path)).values():
        for run in suite.rows:
            args = [*reproduce._config_args(suite, run.config), *suite.overrides, *run.extra,
                    "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]
            if tuple(args) in resolved:  # the same row at another seed (the seed is the run's own argument)
                continue
            resolved.add(tuple(args))
            args = ["cpu" if a == "gpu" else a for a in args]  # the GPU preset, built on this machine
            cli = build_cli(args, run=False)
            overlay = yaml.safe_load((REPO / "configs" / run.config.split("+")[-1]).read_text())
            recipe = overlay.get("model", {}).get("init_args", {}).get("recipe")
            if recipe is not None:
                assert cli.model.settings.recipe == recipe, (suite.name, run.run_id)
            assert cli.model.settings.train_attack.eps == suite.eps, (suite.name, run.run_id)
            if suite.name != "tiny":
                assert Path(cli.datamodule.data_dir) == tmp_path, (suite.name, run.run_id)


@pytest.mark.slow
def test_timing_script_times_every_row_on_its_suites_config_and_writes_the_record_the_report_reads(tmp_path,
                                                                                                   capsys):
    import timing

    timing.main(["tiny", "--rounds", "1", "--chunk", "2", "--records", str(tmp_path)])
    timing = json.loads((tmp_path / "tiny" / "timing.json").read_text())
    # stability trains the robust recipe twice on its profile's subset: timed as robust steps, not on its own.
    assert set(timing["seconds_per_step"]) == {"robust", "ds"}
    assert all(seconds > 0 for seconds in timing["seconds_per_step"].values())
    assert "| ds | 2 |" in capsys.readouterr().out


def test_the_warmup_suite_is_the_cifar10_suite_plus_the_ramp_and_borrows_its_step_timing():
    from report import timing_suite
    from reproduce import suites

    plain, ramped = suites("data")["cifar10"], suites("data")["cifar10_warmup"]
    assert ramped.overrides == (*plain.overrides, "--model.init_args.eps_warmup_epochs", "2")
    assert {run.name for run in ramped.rows} <= {run.name for run in plain.rows}
    assert timing_suite("cifar10_warmup") == "cifar10" and timing_suite("cifar10") == "cifar10"
    assert timing_suite("not_a_suite") == "not_a_suite"


def test_the_batchnorm_suite_is_the_warmup_suite_with_batchnorm_and_its_own_timing():
    from report import timing_suite
    from reproduce import suites

    ramped, normed = suites("data")["cifar10_warmup"], suites("data")["cifar10_bn"]
    assert normed.overrides == (*ramped.overrides, "--model.init_args.model.init_args.batch_norm", "true")
    assert {run.run_id for run in normed.rows} == {"robust-s0", "robust-s1", "robust-s2", "ds-s0", "ds-s1", "ds-s2",
                                                   "random-s0", "random-s1", "random-s2",
                                                   "ds_p1-s0", "selective_margin-s0", "selective_margin-s1",
                                                   "selective_margin-s2", "ds_margin_val-s0", "ds_margin_val-s1",
                                                   "ds_margin_val-s2", "robust_margin_val-s0", "ds_margin-s0",
                                                   "ds_margin-s1", "ds_margin-s2", "ds_20ep-s0", "ds_20ep-s1",
                                                   "ds_20ep-s2", "robust_20ep-s0", "robust_20ep-s1", "robust_20ep-s2",
                                                   "robust_6ep-s0", "robust_6ep-s1", "robust_6ep-s2",
                                                   "ds_shared-s0", "ds_shared-s1", "ds_shared-s2",
                                                   "ds_p075-s0", "ds_p075-s1", "ds_p075-s2"}
    # A margin-validation row is its recipe's row with the validation attack on the logit margin, nothing else.
    by_id = {run.run_id: run for run in normed.rows}
    for run_id in ("ds_margin_val-s1", "robust_margin_val-s0"):
        plain = by_id[run_id.replace("_margin_val", "")]
        assert by_id[run_id].config == plain.config and by_id[run_id].seed == plain.seed
        assert by_id[run_id].extra == (*plain.extra, "--model.init_args.eval_attack.loss", "margin")
    # The margin-training row is the margin-validation row with the training attack on the margin too.
    for seed in (0, 1, 2):
        both, val_only = by_id[f"ds_margin-s{seed}"], by_id[f"ds_margin_val-s{seed}"]
        assert both.config == val_only.config and both.seed == val_only.seed
        assert both.extra == (*val_only.extra, "--model.init_args.train_attack.loss", "margin")
    # A 20-epoch row is its recipe's row trained twice as long, nothing else; the suite's lr schedule is constant
    # over both budgets (its milestones lie past epoch 20), so the first 10 epochs are the 10-epoch run's.
    for run_id in ("ds_20ep-s0", "ds_20ep-s2", "robust_20ep-s0", "robust_20ep-s2"):
        plain = by_id[run_id.replace("_20ep", "")]
        assert by_id[run_id].config == plain.config and by_id[run_id].extra == (*plain.extra, "--trainer.max_epochs",
                                                                                   "20")
    # The 6-epoch row: robust training stopped at selective margin's FLOPs (0.65 of 10 epochs), just under them.
    for seed in (0, 1, 2):
        plain = by_id[f"robust-s{seed}"]
        assert by_id[f"robust_6ep-s{seed}"].extra == (*plain.extra, "--trainer.max_epochs", "6")
    # The shared-forward row: DS's selection, BatchNorm over the whole pool; nothing else differs.
    for seed in (0, 1, 2):
        plain = by_id[f"ds-s{seed}"]
        assert by_id[f"ds_shared-s{seed}"].config == plain.config
        assert by_id[f"ds_shared-s{seed}"].extra == (*plain.extra, "--model.init_args.selection_forward", "shared")
        # ... and the P_up 0.75 row: DS's row with three quarters of the pool backpropagated.
        assert by_id[f"ds_p075-s{seed}"].config == plain.config
        assert by_id[f"ds_p075-s{seed}"].extra == (*plain.extra, "--model.init_args.p_up", "0.75")
    base = yaml.safe_load((REPO / "configs" / normed.base).read_text())
    assert "milestones" not in " ".join(normed.overrides)
    assert min(base["model"]["init_args"]["lr_scheduler"]["init_args"]["milestones"]) > 20
    assert timing_suite("cifar10_bn") == "cifar10_bn"  # more work per step: the cifar10 timing does not hold


def test_a_suite_trains_another_network_by_overlay_name_and_records_it_apart(capsys):
    reproduce.main(["list", "cifar10_gpu", "--model", "wrn34_10"])
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 4 and all("cifar10_gpu_wrn34_10/" in r and "cifar10/base.yaml + models/wrn34_10.yaml + recipes/"
                                  in r for r in rows)
    assert reproduce.with_model(reproduce.suites("data")["cifar10_gpu"], "preact_resnet18").name == "cifar10_gpu"
    unknown = r"`--model` must be one of \[.*'wrn28_10'.*\] \(configs/models/\), got 'wrn99'"
    with pytest.raises(ValueError, match=unknown):
        reproduce.with_model(reproduce.suites("data")["cifar10_gpu"], "wrn99")
