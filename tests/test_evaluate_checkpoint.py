"""A checkpoint's AutoAttack report (``lightning-advsel evaluate``): resumes after a kill to the uninterrupted
report, recomputes no finished batch, and never overwrites what an earlier run saved."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TinyNet, config_args, tiny_batch

from lightning_advsel import AutoAttackConfig
from lightning_advsel.cli import build_cli, main
from lightning_advsel.evaluate_checkpoint import evaluate_autoattack, file_sha256

pytest.importorskip("pyautoattack", reason="needs the eval extra: pip install -e '.[eval]'")
from autoattack_budget import cut_reference_budget  # noqa: E402 - imports pyautoattack

ATTACK = AutoAttackConfig(eps=0.05, version="apgd", seed=1)  # L-inf, pixels
RUN = ("digits/base.yaml", "recipes/standard.yaml")
EVALUATE = ["--model.init_args.test_attack", "AutoAttackConfig", "--model.init_args.test_attack.eps", "0.1",
            "--model.init_args.test_attack.version", "apgd"]
FIRST_BATCHES = ["--data.init_args.batch_size", "32", "--trainer.limit_test_batches", "3"]  # 96 test digits


@pytest.fixture(autouse=True)
def small_budget(monkeypatch) -> None:
    cut_reference_budget(monkeypatch.setattr)


@pytest.fixture
def attacked(monkeypatch) -> list[int]:
    """The batch indices AutoAttack attacks, in order."""
    seen: list[int] = []
    stages = AutoAttackConfig.stages

    def counted(self, model, x, y, *, batch_idx=0, num_classes=None):  # noqa: ANN001, ANN202
        seen.append(batch_idx)
        return stages(self, model, x, y, batch_idx=batch_idx, num_classes=num_classes)

    monkeypatch.setattr(AutoAttackConfig, "stages", counted)
    return seen


def batches(n: int = 4, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [tiny_batch(size, seed=i) for i in range(n)]


def net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


def without_seconds(report: dict) -> dict:
    return {**{k: v for k, v in report.items() if k != "seconds"},
            "batches": [{k: v for k, v in b.items() if k != "seconds"} for b in report["batches"]]}


def test_report_holds_the_settings_the_accuracies_after_each_stage_and_the_checkpoints_hash(tmp_path, capsys):
    ckpt = tmp_path / "weights.ckpt"
    torch.save({"state_dict": net().state_dict()}, ckpt)
    model, data = net(), batches()
    report = evaluate_autoattack(model, data, ATTACK, tmp_path / "aa.json", num_classes=10, checkpoint=ckpt)
    assert report == json.loads((tmp_path / "aa.json").read_text())
    assert not (tmp_path / "aa.json.partial").exists()
    assert report["checkpoint_sha256"] == file_sha256(ckpt) and report["checkpoint"] == str(ckpt)
    assert {k: report[k] for k in ("eps", "norm", "version", "seed", "implementation", "images")} == {
        "eps": 0.05, "norm": "linf", "version": "apgd", "seed": 1, "implementation": "reference", "images": 32}
    assert report["library"].startswith("pyautoattack ") and report["attack"] == ATTACK.describe()
    assert list(report["stages"]) == list(report["robust_after"]) == ["apgd-ce", "apgd-t"]
    # The counts are the attack's own, batch by batch with the batch seed.
    clean = robust = 0
    for i, (x, y) in enumerate(data):
        result = ATTACK.stages(model, x, y, batch_idx=i, num_classes=10)
        clean, robust = clean + int(result.clean.sum()), robust + int(result.robust_after["apgd-t"].sum())
    assert report["clean"] == clean / 32 and report["robust"] == report["robust_after"]["apgd-t"] == robust / 32
    assert report["clean"] >= report["robust_after"]["apgd-ce"] >= report["robust"]
    assert "aa.json: 32 images: clean" in capsys.readouterr().out


def test_a_rerun_after_the_report_reads_it_back_without_attacking(tmp_path, attacked):
    first = evaluate_autoattack(net(), batches(), ATTACK, tmp_path / "aa.json", num_classes=10)
    assert attacked == [0, 1, 2, 3]
    assert evaluate_autoattack(net(), batches(), ATTACK, tmp_path / "aa.json", num_classes=10) == first
    assert attacked == [0, 1, 2, 3]


def test_a_rerun_of_other_settings_is_refused_before_any_work_and_changes_no_file(tmp_path, attacked):
    out = tmp_path / "aa.json"
    evaluate_autoattack(net(), batches(), ATTACK, out, num_classes=10, total_batches=2)
    saved = out.read_bytes()
    other = AutoAttackConfig(eps=0.05, version="apgd", seed=2)
    with pytest.raises(ValueError, match=r"holds a finished evaluation of other settings: seed=1 \(asked: 2\)"):
        evaluate_autoattack(net(), batches(), other, out, num_classes=10, total_batches=2)
    # Partial results: a kill after two of four batches leaves them in OUT.partial.
    partial_out = tmp_path / "partial.json"
    with pytest.raises(KeyboardInterrupt):
        evaluate_autoattack(net(), interrupted(batches(), after=2), ATTACK, partial_out, num_classes=10)
    partial = partial_out.with_name("partial.json.partial").read_bytes()
    attacked.clear()
    with pytest.raises(ValueError, match=r"holds partial results of other settings: batch_limit=None \(asked: 3\)"):
        evaluate_autoattack(net(), batches(), ATTACK, partial_out, num_classes=10, total_batches=3)
    assert attacked == [] and out.read_bytes() == saved
    assert partial_out.with_name("partial.json.partial").read_bytes() == partial and not partial_out.exists()


def interrupted(data: list, after: int):  # noqa: ANN201 - a generator of batches
    """``data``'s batches, then a KeyboardInterrupt where the next would come: a run stopped after ``after``."""
    yield from data[:after]
    raise KeyboardInterrupt


def test_a_resumed_run_attacks_only_the_batches_left_and_reports_what_an_uninterrupted_run_does(tmp_path, attacked):
    with pytest.raises(KeyboardInterrupt):
        evaluate_autoattack(net(), interrupted(batches(), after=3), ATTACK, tmp_path / "a.json", num_classes=10)
    # A kill during a write leaves the last line cut short: it is dropped and its batch attacked again.
    partial = tmp_path / "a.json.partial"
    partial.write_text(partial.read_text()[:-20])
    attacked.clear()
    resumed = evaluate_autoattack(net(), batches(), ATTACK, tmp_path / "a.json", num_classes=10)
    assert attacked == [2, 3]
    whole = evaluate_autoattack(net(), batches(), ATTACK, tmp_path / "b.json", num_classes=10)
    assert without_seconds(resumed) == without_seconds(whole)


def test_a_finished_batch_whose_data_changed_is_refused(tmp_path, attacked):
    with pytest.raises(KeyboardInterrupt):
        evaluate_autoattack(net(), interrupted(batches(), after=2), ATTACK, tmp_path / "a.json", num_classes=10)
    changed = batches()
    changed[1] = (changed[1][0].flip(0), changed[1][1].flip(0))
    attacked.clear()
    with pytest.raises(ValueError, match=r"test batch 1 differs from the one whose results .* holds"):
        evaluate_autoattack(net(), changed, ATTACK, tmp_path / "a.json", num_classes=10)
    assert attacked == []


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"out": "."}, r"`out` must be a file path, got the folder '.'"),
        ({"num_classes": 3}, r"AutoAttack apgd needs a classifier of at least 4 classes .*`num_classes`=3"),
        ({"total_batches": -1}, r"`total_batches` must be an integer >= 0 or None, got -1"),
        ({"checkpoint": "missing.ckpt"}, r"`checkpoint` must be a file, got 'missing.ckpt'"),
        ({"attack": "autoattack"}, r"`attack` must be an AutoAttackConfig, got str"),
    ],
)
def test_bad_arguments_fail_before_any_file_is_written(tmp_path, monkeypatch, kwargs, match):
    monkeypatch.chdir(tmp_path)
    arguments = {"attack": ATTACK, "out": "aa.json", "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        evaluate_autoattack(net(), batches(), arguments.pop("attack"), arguments.pop("out"), **arguments)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The last checkpoint of a two-step CLI fit on digits."""
    logs = tmp_path_factory.mktemp("logs")
    cli = build_cli(["fit", *config_args(*RUN), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                     "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
                     "--trainer.logger.init_args.save_dir", str(logs)])
    return Path(cli.trainer.checkpoint_callback.last_model_path)


@pytest.mark.slow
def test_evaluate_command_killed_mid_run_resumes_to_the_uninterrupted_report(checkpoint, tmp_path, attacked, capsys):
    args = [*config_args(*RUN), "--ckpt_path", str(checkpoint), *EVALUATE, *FIRST_BATCHES]
    marker, out = tmp_path / "paused", tmp_path / "aa.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "evaluate_worker.py"), str(marker), "1", *args,
                             "--out", str(out)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL and marker.exists(), output[-3000:]
    assert "AutoAttack apgd (reference)" in output  # the progress bar
    assert not out.exists() and len(out.with_name("aa.json.partial").read_text().splitlines()) == 1 + 1

    main(["evaluate", *args, "--out", str(out)])  # the README's command, rerun
    assert attacked == [1, 2]  # only the batches left
    assert "resuming from" in capsys.readouterr().out
    main(["evaluate", *args, "--out", str(tmp_path / "whole.json")])
    resumed, whole = (json.loads(p.read_text()) for p in (out, tmp_path / "whole.json"))
    assert without_seconds(resumed) == without_seconds(whole) and resumed["images"] == 96
    assert resumed["checkpoint_sha256"] == file_sha256(checkpoint)


def test_evaluate_command_refuses_a_pgd_test_attack_and_a_missing_checkpoint(checkpoint, tmp_path):
    out = tmp_path / "aa.json"
    with pytest.raises(ValueError, match=r"`test_attack` must be an AutoAttackConfig for evaluate, got AttackConfig"):
        main(["evaluate", *config_args(*RUN), "--ckpt_path", str(checkpoint), "--out", str(out),
              "--model.init_args.test_attack", "AttackConfig", "--model.init_args.test_attack.eps", "0.1"])
    with pytest.raises(ValueError, match=r"`--ckpt_path` must be a checkpoint file, got 'missing.ckpt'"):
        main(["evaluate", *config_args(*RUN), "--ckpt_path", "missing.ckpt", "--out", str(out), *EVALUATE])
    assert not out.exists() and not out.with_name("aa.json.partial").exists()
