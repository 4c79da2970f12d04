"""benchmarks/speed.py and benchmarks/gpu_speed.py end to end on a tiny budget (``--quick``; no timing asserted)."""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, SHARED_DATA

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_speed  # noqa: E402
import speed  # noqa: E402


def test_speed_quick_reports_every_variant_the_targets_and_appends_to_the_json_file(tmp_path, capsys):
    out = tmp_path / "speed.json"
    out.write_text(json.dumps([{"earlier": "run"}]))
    record = speed.main(["--data", "digits", "--quick", "--json", str(out)])
    assert [r["variant"] for r in record["rows"]] == [v.label for v in speed.VARIANTS]
    for row in record["rows"]:
        assert row["runs"] == 1 and row["min_s"] <= row["median_s"] <= row["max_s"]
        assert row["outside_s"] >= 0
    module_rows = [r for r in record["rows"] if "module" in r["variant"]]
    assert all(r["outside_s"] > 0 for r in module_rows)  # Trainer construction and fit setup, reported apart
    targets = {c["comparison"]: c["target"] for c in record["comparisons"]}
    assert targets["robust: module / plain loop"] == "<= 1.02"
    assert targets["ds p_up 0.5: module / plain loop"] == "<= 1.02"
    # flops_per_step.analytic_units at PGD-2: selective's (k + 4) / (2k + 3) of robust training.
    assert targets["selective margin 0.5 / robust (module)"] == f"FLOP floor {(2 + 4) / (2 * 2 + 3):.3f}"
    assert targets["ds p_up 0.5 / ds p_up 1 (module)"].startswith("FLOP floor 0.")
    assert json.loads(out.read_text())[0] == {"earlier": "run"} and len(json.loads(out.read_text())) == 2
    # The selected rows' backward holds less than the whole pool's; a variant measured alone reads the same.
    peak = {r["variant"]: r["peak_mib"] for r in record["rows"]}
    assert peak["ds p_up 0.5, module"] < peak["ds p_up 1, module"]
    alone = speed.main(["--data", "digits", "--quick", "--memory-of", "ds p_up 1, module"])
    assert alone == {"mib": peak["ds p_up 1, module"]}
    printed = capsys.readouterr().out
    assert "| robust, plain loop | 1 |" in printed
    assert "| comparison | measured (median of per-repeat ratios) |" in printed


def test_speed_on_mnist_uses_the_mnist_configs_setting_and_needs_a_data_dir():
    setup = speed.setup_for("mnist", "/data", None, None)
    assert setup.attack.describe() == "PGD-40 linf eps=0.3 alpha=0.01 restarts=1" and setup.lr == 1e-4
    assert setup.make_data().batch_size == 100 and setup.make_model().head[0].out_features == 1024
    with pytest.raises(SystemExit, match="--data mnist needs --data-dir"):
        speed.main(["--quick"])


def test_speed_profile_splits_each_recipes_step_into_its_phases(capsys):
    rows = speed.main(["--data", "digits", "--quick", "--profile", "--top", "3"])["profile"]
    assert [r["variant"] for r in rows] == [v.label for v in speed.VARIANTS if not v.plain]
    for r in rows:
        assert r["attack"] > 0 and r["update"] > 0
        assert r["attack"] + r["scoring"] + r["update"] + r["framework"] == pytest.approx(r["batch"])
    by_label = {r["variant"]: r for r in rows}
    assert by_label["ds p_up 0.5, module"]["scoring"] > 0  # the no-grad pass over the pool
    assert "| recipe | ms / step | attack | scoring | update | framework |" in capsys.readouterr().out


def check_gpu_rows(record: dict) -> None:
    """What every run of gpu_speed.py records, whatever the device and precision."""
    rows = {r["recipe"]: r for r in record["rows"]}
    # Each module recipe, with robust and ds each followed by the hand-written loop on the same images.
    assert list(rows) == ["robust", "robust, plain loop", "ds p_up 0.5", "ds p_up 0.5, plain loop",
                          "selective margin", "selective_ds margin"]
    for r in rows.values():
        assert r["images_per_s"] > 0 and r["flops_per_step"] > 0 and r["peak_share"] > 0
    # Selective training attacks half the batch: fewer FLOPs per step than robust training.
    assert rows["selective margin"]["flops_per_step"] < rows["robust"]["flops_per_step"]
    # The loop does the module's work: the same FLOPs per step, counted the same way.
    for recipe in ("robust", "ds p_up 0.5"):
        assert rows[f"{recipe}, plain loop"]["flops_per_step"] == pytest.approx(rows[recipe]["flops_per_step"],
                                                                                rel=0.02)
    comparisons = {c["comparison"]: c for c in record["comparisons"]}
    assert list(comparisons) == ["robust: module / plain loop, images per second",
                                 "ds p_up 0.5: module / plain loop, images per second"]
    assert all(c["measured"] > 0 and c["target"] == ">= 0.95" for c in comparisons.values())
    # Rounds: each comparison is the median of the rounds' ratios, each row the median of its runs.
    assert all(c["rounds"] == record["rounds"] for c in comparisons.values())
    assert all(c["min"] <= c["measured"] <= c["max"] for c in comparisons.values())
    assert all(r["min_images_per_s"] <= r["images_per_s"] <= r["max_images_per_s"] for r in rows.values())


@pytest.fixture(scope="module")
def bf16_quick_record() -> dict:
    """One quick CPU run of gpu_speed.py under bf16 autocast, with a one-step profile of robust training (the fp32
    path runs in the shell script's test below)."""
    return gpu_speed.main(["--device", "cpu", "--quick", "--precision", "bf16-mixed", "--profile", "robust",
                           "--profile-steps", "1"])


@pytest.mark.slow
def test_gpu_script_code_path_runs_on_cpu_under_bf16_autocast(bf16_quick_record):
    record = bf16_quick_record
    assert record["precision"] == "bf16-mixed" and record["rounds"] == 2  # --quick's rounds, the loop first in one
    check_gpu_rows(record)
    assert "share of the bf16 peak" in gpu_speed.format_tables(record["rows"], record["comparisons"])
    assert [p["recipe"] for p in record["profile"]] == ["robust"] and record["profile"][0]["steps"] == 1


def test_gpu_script_refuses_to_profile_without_a_warm_up():
    with pytest.raises(SystemExit):
        gpu_speed.main(["--device", "cpu", "--warmup", "0", "--profile", "robust"])


def _module_level_imports(path) -> set[str]:
    """Top-level package names imported at module level, outside ``try`` blocks (optional imports)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_gpu_script_needs_neither_jsonargparse_nor_torchattacks():
    """The GPU machine has torch and lightning: the script, its helpers and the package modules it loads import
    neither the command line's parser nor the AutoAttack package at import time (only the CLI does)."""
    files = [REPO / "benchmarks" / name for name in ("gpu_speed.py", "speed.py", "flop_count.py", "flops_per_step.py")]
    files += [p for p in (REPO / "lightning_advsel").rglob("*.py") if p.name != "cli.py"]
    for path in files:
        assert not _module_level_imports(path) & {"jsonargparse", "torchattacks"}, path
        assert "lightning_advsel.cli" not in path.read_text() or path.name == "__init__.py", path


def test_step_pairs_time_each_pair_on_the_same_batches_against_its_flop_floor(capsys):
    rows = speed.main(["--data", "digits", "--quick", "--step-pairs", "3"])["step_pairs"]
    assert [r["comparison"] for r in rows] == [f"{p.a} / {p.b} (step)" for p in speed.STEP_PAIRS]
    for r in rows:
        assert r["steps"] == 3 and r["min"] <= r["q1"] <= r["measured"] <= r["q3"] <= r["max"]
        assert r["a_median_ms"] > 0 and r["b_median_ms"] > 0
    floors = {r["comparison"].removesuffix(" (step)"): r["floor"] for r in rows}
    assert floors["selective margin 0.5 / robust"] == pytest.approx((2 + 4) / (2 * 2 + 3))  # PGD-2
    assert floors["ds p_up 0.5 / ds p_up 1"] < 1 and floors["ds p_up 1 / ds p_up 1 (again)"] == 1
    assert floors["robust, package step / robust, plain step"] == 1
    assert "| comparison | steps | a, ms / step |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        speed.main(["--data", "digits", "--quick", "--step-pairs", "1"])


def test_the_compiled_attack_step_pairs_report_each_recipe_against_its_eager_step_with_the_compile_time(capsys):
    """speed.py --compile-attack: the step with the attack compiled (aot_eager here; inductor by default) against
    the eager step, each recipe, with its compile seconds; the compilation falls in the untimed warm-up."""
    record = speed.main(["--data", "digits", "--quick", "--step-pairs", "2", "--compile-attack",
                         "--attack-backend", "aot_eager"])
    rows = record["step_pairs"]
    assert [r["comparison"] for r in rows] == [f"{p.a} / {p.b} (step)" for p in speed.COMPILED_PAIRS]
    assert [r["comparison"].split(",")[0] for r in rows] == ["robust", "ds p_up 0.5", "selective margin 0.5"]
    for r in rows:
        assert r["floor"] == 1 and r["compile_s"] > 0 and r["graphs"] == 1 and r["eager_calls"] == 0
    assert record["warmup"] == 1 and record["attack_graph"] == "step" and record["attack_backend"] == "aot_eager"
    assert "| FLOP floor | compile s |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        speed.main(["--data", "digits", "--quick", "--compile-attack"])  # it times steps: --step-pairs needed


def test_a_comparison_is_the_median_of_per_repeat_ratios_not_a_ratio_of_medians():
    runs = {"a": [(2.0, 0.0), (6.0, 0.0), (3.0, 0.0)], "b": [(1.0, 0.0), (2.0, 0.0), (3.0, 0.0)]}
    # Per repeat: 2, 3 and 1; the medians' ratio would be 3 / 2.
    assert speed.paired(runs, "a", "b") == {"measured": 2.0, "min": 1.0, "max": 3.0}


def test_gpu_results_get_a_section_of_their_own_in_the_report(tmp_path, bf16_quick_record):
    from report import gpu_speed_section, speed_section

    folder = tmp_path / "records" / "speed"
    folder.mkdir(parents=True)
    record = bf16_quick_record
    assert gpu_speed_section(folder) == []
    (folder / "gpu.json").write_text(json.dumps([record, {**record, "quick": False, "compile": True}]))
    lines = "\n".join(gpu_speed_section(folder))  # the quick check left out, the full result shown
    assert lines.count("| robust, plain loop | ") == 1 and "compile True, 2 timed steps x 2 round(s)" in lines
    assert "| robust: module / plain loop, images per second | " in lines
    assert "| robust | " in lines.split("| profiled recipe |")[1]  # the profile's busy share and launches
    assert speed_section(folder) == []  # the CPU section reads speed.py's results only


def test_the_report_ends_with_the_newest_full_speed_results_and_skips_quick_checks(tmp_path):
    from report import load, speed_section

    folder = tmp_path / "records" / "speed"
    folder.mkdir(parents=True)
    results = folder / "cpu.json"
    speed.main(["--data", "digits", "--steps", "2", "--warmup", "0", "--step-pairs", "2", "--json", str(results)])
    speed.main(["--data", "digits", "--steps", "2", "--profile", "--batches", "1", "--top", "3",
                "--json", str(results)])
    speed.main(["--data", "digits", "--quick", "--step-pairs", "3", "--json", str(results)])  # a check: left out
    lines = "\n".join(speed_section(folder))
    assert "Steps back to back" in lines and "| ds p_up 0.5 / ds p_up 1 (step) | 2 |" in lines
    assert "| ds p_up 0.5 / ds p_up 1 (step) | 3 |" not in lines
    assert "| recipe | ms / step | attack | scoring | update | framework |" in lines
    assert lines.count("| robust, module | `aten::") == 3  # the profile's top operators, as many as recorded
    assert "Epochs (" not in lines  # no epoch comparison recorded
    assert load(tmp_path / "records") == {}  # speed results are not runs of a suite
    assert speed_section(tmp_path) == []


@pytest.mark.slow
def test_the_gpu_script_runs_the_compiled_attack_first_then_the_module_and_keeps_each_result(tmp_path):
    """benchmarks/gpu_speed.sh, the one command for a GPU machine, checked on CPU: the compiled-attack stage (the
    option off and on, robust and selective only, aot_eager instead of code generation), then the module's stage;
    the whole-loop graph's stage left out (LOOP=0)."""
    env = {**os.environ, "GPU_SPEED_ARGS": "--device cpu --quick --precision 32-true --profile-steps 2 --rounds 1",
           "COMPILED_SPEED_ARGS": "--device cpu --quick --precision 32-true --attack-backend aot_eager "
                                  "--recipes robust selective",
           "LOOP": "0", "PYTHON": sys.executable,
           # The CLI epoch on the real JPEG copy: two batches of 8 through a small CNN, its decode cached here.
           "CIFAR10_DIR": str(SHARED_DATA),
           "CLI_EPOCH_ARGS": f"--device cpu --attack-backend aot_eager --recipes robust "
                             f"--trainer.limit_train_batches 2 --data.init_args.batch_size 8 "
                             f"--data.init_args.cache_dir {tmp_path / 'cache'} "
                             f"--model.init_args.train_attack.steps 2 --model.init_args.model "
                             f"lightning_advsel.models.SmallCNN --model.init_args.model.init_args.in_channels=3 "
                             f"--model.init_args.model.init_args.input_size=32 "
                             f"--model.init_args.model.init_args.width=8 --model.init_args.model.init_args.hidden=32"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_speed.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.index("== attack_compiled") < done.stdout.index("== bf16_channels_last")
    assert "compiled attack check: adversarial loss eager" in done.stdout

    (compiled,) = json.loads((tmp_path / "compiled.json").read_text())
    assert compiled["compiled_attack"] and compiled["attack_check"]["relative_difference"] < 1e-4
    rows = {(r["recipe"], r["kind"]): r for r in compiled["rows"]}
    assert list(rows) == [("robust", "eager attack"), ("robust", "compiled attack"), ("robust", "plain loop"),
                          ("selective margin", "eager attack"), ("selective margin", "compiled attack")]
    for r in rows.values():
        assert r["images_per_s"] > 0 and r["peak_share"] > 0 and r["eager_calls"] == 0
        assert 0 < r["busy_share"] and r["launches_per_step"] == 0  # no kernels on a CPU
    assert rows[("robust", "compiled attack")]["flops_per_step"] == rows[("robust", "eager attack")]["flops_per_step"]
    assert rows[("selective margin", "compiled attack")]["compile_s"] > 0  # its attacked half: a graph of its own
    targets = {c["comparison"]: c["target"] for c in compiled["comparisons"]}
    assert targets["selective margin / robust, step time, both compiled"] == "<= 0.7"
    assert targets["robust compiled / plain eager loop, images per second"] == ">= 1.4"
    assert targets["robust compiled, share of the bf16 dense peak"] == ">= 0.2"

    (record,) = json.loads((tmp_path / "gpu.json").read_text())
    assert record["precision"] == "32-true" and record["rounds"] == 1 and record["channels_last"]
    check_gpu_rows(record)
    # Where the steps' time goes, for the recipes the module's stage names.
    assert [p["recipe"] for p in record["profile"]] == ["robust", "selective margin"]
    for prof in record["profile"]:
        assert prof["steps"] == 2 and 0 < prof["busy_share"] and prof["launches_per_step"] == 0
        assert prof["top"] and all(op["ms_per_step"] > 0 for op in prof["top"])
    assert (tmp_path / "attack_compiled.txt").exists() and (tmp_path / "bf16_channels_last.txt").exists()
    assert "whole script" in done.stdout and "attack_compiled_loop" not in done.stdout

    # The last stage: one epoch from the command line, eager then compiled, each with the images it held.
    assert done.stdout.index("== bf16_channels_last") < done.stdout.index("== cli_epoch")
    eager, compiled_run = json.loads((tmp_path / "cli_epoch.json").read_text())
    assert (eager["compile_attack"], compiled_run["compile_attack"]) == (False, True)
    assert not eager["attack_compiled"] and compiled_run["attack_compiled"]
    for run in (eager, compiled_run):
        assert run["recipe"] == "robust" and run["images"] == 16 and run["batches"] == 2
        assert run["images_per_s"] == pytest.approx(16 / run["epoch_s"], rel=1e-2) and run["fit_s"] > run["epoch_s"]
    assert "robust: compiled / eager, images per second" in done.stdout

    # A failing stage is reported with the end of its printout, does not stop the next one, and fails the script
    # (an interpreter that fails at once stands in for a failing run); past the call's time a stage is skipped.
    failing = tmp_path / "failing_python"
    failing.write_text("#!/bin/sh\necho \"stage broke: $*\" >&2\nexit 3\n")
    failing.chmod(0o755)
    bad = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_speed.sh"), str(tmp_path / "bad")],
                         env={**env, "PYTHON": str(failing), "LOOP": "1"}, capture_output=True, text=True,
                         timeout=60, check=False)
    assert bad.returncode == 1 and bad.stdout.count("failed or out of its 240 s") == 4
    assert "stage broke: benchmarks/compiled_speed.py" in bad.stdout and "--attack-graph loop" in bad.stdout
    late = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_speed.sh"), str(tmp_path / "late")],
                          env={**env, "PYTHON": str(failing), "TOTAL_SECONDS": "20"}, capture_output=True, text=True,
                          timeout=60, check=False)
    assert late.returncode == 1 and late.stdout.count("skipped, ") == 3 and "stage broke" not in late.stdout


def test_the_gpu_clock_is_read_at_the_two_ends_of_the_timed_steps_only():
    """No sync between timed steps: they queue ahead as in a real run, the plain loop's as the module's."""
    assert gpu_speed.window(5, 20) == (4, 24) and gpu_speed.window(0, 3) == (0, 2)
    args = argparse.Namespace(warmup=5, steps=20, batch_size=256)
    rate = gpu_speed.throughput([10.0, 12.0], args, step_flops=1e12)
    assert rate["images_per_s"] == 20 * 256 / 2 and rate["ms_per_step"] == 100 and rate["flops_per_s"] == 1e13
    clock = gpu_speed.StepClock(gpu_speed.window(1, 3))
    for batch_idx in range(4):
        clock.on_train_batch_end(argparse.Namespace(strategy=argparse.Namespace(root_device=torch.device("cpu"))),
                                 None, None, None, batch_idx)
    assert len(clock.marks) == 2


def test_a_compile_mode_compiles_the_module_and_the_loop_in_that_mode(monkeypatch):
    """--compile-mode reduce-overhead (CUDA graphs on a GPU) reaches torch.compile for both sides; the eager backend
    stands in for code generation, which a CPU would spend minutes on."""
    modes = []
    compile_ = torch.compile

    def recording(fn, **kwargs):  # noqa: ANN001, ANN202 - torch.compile's signature
        modes.append(kwargs.get("mode"))
        return compile_(fn, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", recording)
    args = argparse.Namespace(compile=True, compile_mode="reduce-overhead", channels_last=False, pgd_steps=1)
    module = gpu_speed.make_module("robust", 1.0, args)
    assert modes == ["reduce-overhead"] and not module.compile_model  # compiled here, not by the module's option
    args.compile_mode = None  # plain --compile: the module's own option, in the default mode
    assert gpu_speed.make_module("robust", 1.0, args).compile_model and modes == ["reduce-overhead"]


def test_gpu_speed_builds_a_network_overlay_by_name_as_the_cli_does():
    from lightning_advsel.models import ResNet18, WideResNet

    assert gpu_speed.MODELS[0] == "resnet18" and {"preact_resnet18", "wrn28_10", "wrn34_10"} <= set(gpu_speed.MODELS)
    assert type(gpu_speed.network("resnet18")) is ResNet18
    wide = gpu_speed.network("wrn28_10")
    assert isinstance(wide, WideResNet) and sum(p.numel() for p in wide.parameters()) == 36_479_194
