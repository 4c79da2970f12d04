"""The re-measurement with AutoAttack's reference code: its plan, a row refitted and evaluated by both
implementations on the same weights, and the report that shows both without averaging across them."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import remeasure  # noqa: E402
import reproduce  # noqa: E402
from report import autoattack_results, remeasure_note, seed_table, standard_gap, suite_table  # noqa: E402


def test_plan_runs_apgd_on_every_row_seed_zero_first_then_the_standard_versions_on_the_seed_zero_subset():
    steps = remeasure.plan(reproduce.suites("data"))
    apgd = [s for s in steps if s.phase == "apgd"]
    assert [s.phase for s in steps] == ["apgd"] * 24 + ["standard"] * 6 + ["torchattacks_standard"] * 6
    assert [s.run.seed for s in apgd] == [0] * 8 + [1] * 8 + [2] * 8
    assert {(s.suite.name, s.run.name) for s in apgd} == {(suite, row) for suite in remeasure.SUITES
                                                          for row in remeasure.ROWS}
    standard = [(s.suite.name, s.run.run_id) for s in steps if s.phase == "standard"]
    assert standard == [(suite, f"{row}-s0") for suite in remeasure.SUITES
                        for row in ("robust", "ds", "selective_margin")]
    mnist_apgd, mnist_standard = apgd[0], next(s for s in steps if s.phase == "standard")
    assert mnist_apgd.evaluations == (("torchattacks", "apgd", 10), ("reference", "apgd", 10))  # 1,000 images
    assert mnist_standard.evaluations == (("reference", "standard", 5),)  # the 500 images of the records


def test_every_evaluation_of_the_plan_resolves_through_the_cli(tmp_path):
    """The evaluate command's arguments of each kind of step: a typo would only fail hours into the plan."""
    from lightning_advsel import AutoAttackConfig
    from lightning_advsel.cli import build_cli

    for step in remeasure.plan(reproduce.suites(str(tmp_path))):
        if step.run.seed or step.run.name != "robust":
            continue
        for implementation, version, batches in step.evaluations:
            cli = build_cli([*remeasure.evaluate_args(step, implementation, version, batches), "--trainer.logger",
                             "false"], run=False)
            assert cli.model.test_attack == AutoAttackConfig(eps=step.suite.eps, version=version,
                                                             implementation=implementation)
            assert cli.trainer.limit_test_batches == batches and cli.datamodule.batch_size == 100


def run(row: str, seed: int, apgd: float, standard: float | None = None) -> dict:
    test = {"pgd20": {"clean": 0.9, "robust": 0.5, "images": 100},
            "aa_apgd": {"clean": 0.9, "robust": apgd, "images": 100, "attack": "AutoAttack apgd (APGD-CE, APGD-T)"}}
    if standard is not None:
        test["aa_standard"] = {"clean": 0.9, "robust": standard, "images": 50, "attack": "AutoAttack standard"}
    return {"row": row, "seed": seed, "test": test, "train_flops": 1, "steps": 1}


def remeasured(**evaluations: float) -> dict:
    return {"evaluations": {key.replace("__", "/"): {"robust": value, "clean": 0.9, "images": 100 if "apgd" in key
                                                     else 50, "attack": key} for key, value in evaluations.items()}}


def test_report_shows_each_implementation_apart_and_names_the_seeds_a_column_holds():
    rows = {"robust": [run("robust", 0, 0.40, standard=0.38), run("robust", 1, 0.42)], "ds": [run("ds", 0, 0.30)]}
    again = {("robust", 0): remeasured(torchattacks__apgd=0.40, reference__apgd=0.35, reference__standard=0.33)}
    for recs in rows.values():
        for r in recs:
            r["autoattack"] = autoattack_results(r, again.get((r["row"], r["seed"])))
    table, points = suite_table("s", rows, None)
    assert table[0] == ("| recipe | seeds | clean % | PGD-20 % | AutoAttack apgd % (torchattacks, 100 images) | "
                        "AutoAttack apgd % (reference, 100 images) | FLOPs / robust | time / robust |")
    # torchattacks at both seeds; the reference at seed 0 alone, never averaged with torchattacks' seed 1.
    assert table[2] == "| robust | 2 | 90.0 ± 0.0 | 50.0 ± 0.0 | 41.0 ± 1.4 | 35.0 (seed 0) | 1.000 |  |"
    assert table[3] == "| ds | 1 | 90.0 | 50.0 | 30.0 |  | 1.000 |  |"
    assert {p["implementation"] for p in points} == {"torchattacks"}  # the reference is not there for every run
    assert seed_table(rows)[2:] == ["| robust | 0 | 90.0 | 50.0 | 40.0 | 35.0 |",
                                    "| robust | 1 | 90.0 | 50.0 | 42.0 |  |"]
    assert standard_gap(rows)[2:] == ["| robust | 0 | 50 | 38.0 | 33.0 |"]


def test_a_refit_that_differs_from_its_record_stays_out_of_the_row_and_is_shown_apart():
    rows = {"robust": [run("robust", 0, 0.40), run("robust", 1, 0.42)]}
    again = {("s", "robust", 0): {**remeasured(torchattacks__apgd=0.45, reference__apgd=0.44),
                                  "reproduces_original": False}}
    for r in rows["robust"]:
        r["autoattack"] = autoattack_results(r, again.get(("s", r["row"], r["seed"])))
    table, _ = suite_table("s", rows, None)
    # The row keeps the record's own weights' numbers: torchattacks 40 and 42, no reference column.
    assert table[2] == "| robust | 2 | 90.0 ± 0.0 | 50.0 ± 0.0 | 41.0 ± 1.4 | 1.000 |  |"
    note = remeasure_note(rows, again, "s")
    assert "for 0 of them; not for robust-s0." in note[0]
    assert "| robust-s0 | 90.0 | 45.0 | 44.0 |  |  |" in note


@pytest.mark.slow
def test_a_remeasured_row_refits_the_tested_weights_records_both_implementations_and_is_not_run_twice(
        tmp_path, monkeypatch):
    from autoattack_budget import cut_reference_budget

    cut_reference_budget(monkeypatch.setattr)
    monkeypatch.chdir(tmp_path)  # a fit works in its run's folder
    records, runs = tmp_path / "records", tmp_path / "runs"
    common = ["--records", str(records), "--runs", str(runs)]
    reproduce.main(["_one", "tiny", "robust-s0", *common])  # the original record: the reference by default now
    remeasure.main(["_step", "tiny", "robust-s0", "apgd", *common])
    record = json.loads((records / "tiny" / "reference" / "robust-s0.json").read_text())
    assert set(record["evaluations"]) == {"torchattacks/apgd", "reference/apgd"}
    assert record["reproduces_original"] is True  # the refit's reference apgd is the record's, image for image
    assert record["evaluations"]["reference/apgd"]["images"] == 16
    assert record["weights"]["bytes"] > 0 and not record["weights"]["kept_beside_record"]  # tiny's are not kept

    fits = []
    monkeypatch.setattr(remeasure, "fit_run", lambda *a: fits.append(a))
    remeasure.main(["_step", "tiny", "robust-s0", "apgd", *common])  # the weights and both evaluations are there
    assert fits == [] and json.loads((records / "tiny" / "reference" / "robust-s0.json").read_text())[
        "evaluations"] == record["evaluations"]
    out = tmp_path / "RESULTS.md"
    reproduce.main(["report", "--records", str(records), "--out", str(out)])
    text = out.read_text()
    assert "AutoAttack apgd % (torchattacks, 16 images) | AutoAttack apgd % (reference, 16 images)" in text
    assert "the refit reproduced the tested weights of the record" in text and "for 1 of them." in text
