"""The command line end to end: fit, checkpoints, validate/test, and refusing bad input before training."""

from __future__ import annotations

import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import MAIN_JOB, REPO, SHARED_DATA, config_args, digits

from lightning_advsel import AdversarialSelectionModule
from lightning_advsel.cli import build_cli, main

TINY = [
    "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "4", "--trainer.enable_progress_bar", "false",
    "--model.init_args.train_attack.steps", "2", "--model.init_args.eval_attack.steps", "3",
]


def fit(configs: list[str], tmp_path: Path, *extra: str):
    return build_cli(["fit", *configs, *TINY,
                      "--trainer.logger.init_args.save_dir", str(tmp_path), *extra])


def test_fit_checkpoint_load_and_validate_reproduce_the_validation_numbers(tmp_path, capsys):
    cli = fit(config_args(*MAIN_JOB), tmp_path)
    out = capsys.readouterr().out
    val_clean = float(cli.trainer.callback_metrics["val/acc_clean"])
    val_robust = float(cli.trainer.callback_metrics["val/acc_robust"])
    assert f"val accuracy: clean {val_clean:.4f}, robust {val_robust:.4f} (PGD-3 linf eps=0.1" in out

    ckpt = Path(cli.trainer.checkpoint_callback.last_model_path)
    assert ckpt.name == "last.ckpt" and ckpt.exists()
    # The CLI stores the model's config, so the checkpoint loads with no arguments and plain-value hparams.
    loaded = AdversarialSelectionModule.load_from_checkpoint(ckpt)
    assert type(loaded.model).__name__ == "SmallCNN"
    for a, b in zip(loaded.model.parameters(), cli.model.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["recipe"] == "ds"

    again = build_cli(["validate", *config_args(*MAIN_JOB), *TINY,
                       "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
                       "--ckpt_path", str(ckpt)])
    assert float(again.trainer.callback_metrics["val/acc_clean"]) == pytest.approx(val_clean, abs=1e-7)
    assert float(again.trainer.callback_metrics["val/acc_robust"]) == pytest.approx(val_robust, abs=1e-7)

    tested = build_cli(["test", *config_args(*MAIN_JOB), *TINY,
                        "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
                        "--ckpt_path", str(ckpt)])
    metrics = tested.trainer.callback_metrics
    assert 0 <= float(metrics["test/acc_robust"]) <= float(metrics["test/acc_clean"]) <= 1
    assert "test accuracy: clean" in capsys.readouterr().out


@pytest.mark.parametrize("overlay,recipe", [("standard", "standard"), ("robust", "robust"), ("random", "random"),
                                            ("ds_p1", "ds")])
def test_baseline_configs_run_their_recipe(tmp_path, overlay, recipe):
    cli = fit(digits(overlay), tmp_path, "--trainer.max_epochs", "1")
    assert cli.model.settings.recipe == recipe
    assert cli.trainer.global_step == 4
    frac = float(cli.trainer.callback_metrics["train/selected_adv_frac"])
    expected = {"standard": 0.0, "robust": 1.0, "ds": 0.5}.get(recipe)
    if expected is not None:
        assert frac == pytest.approx(expected)
    else:
        assert 0.0 < frac < 1.0


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_paper_configs_parse_with_the_papers_settings(dataset, capsys):
    for method in ("standard", "robust", "ds", "random"):
        with pytest.raises(SystemExit) as exit_info:
            build_cli(["fit", *config_args(f"{dataset}/base.yaml", f"recipes/{method}.yaml"), "--print_config"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert f"recipe: {method}" in text
    if dataset == "cifar10":
        assert "eps: 0.03137" in text and "steps: 20" in text and "batch_size: 256" in text
    else:
        assert "eps: 0.3" in text


@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").exists(), reason="needs ../shared/data/MNIST")
def test_mnist_config_trains_from_a_torchvision_layout_folder(tmp_path):
    cli = build_cli(["fit", *config_args("mnist/base.yaml", "recipes/ds.yaml"),
                     "--data.init_args.data_dir", str(SHARED_DATA), "--trainer.accelerator", "cpu",
                     "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                     "--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "0",
                     "--trainer.enable_progress_bar", "false", "--data.init_args.batch_size", "16",
                     "--model.init_args.train_attack.steps", "1", "--model.init_args.eval_attack.steps", "1",
                     "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert cli.trainer.global_step == 2
    assert 0 <= float(cli.trainer.callback_metrics["val/acc_clean"]) <= 1
    # The epoch with the best val/acc_robust is kept besides last.ckpt, named without a folder for the '/'.
    names = sorted(p.name for p in tmp_path.rglob("*.ckpt"))
    robust = float(cli.trainer.callback_metrics["val/acc_robust"])
    assert names == [f"best-epoch0-robust{robust:.4f}.ckpt", "last.ckpt"]


@pytest.mark.parametrize(
    "override,match",
    [
        (["--model.init_args.p_up", "1.5"], r"`p_up` must be in \(0, 1\], got 1.5"),
        (["--model.init_args.p_up", "0"], r"`p_up` must be in \(0, 1\], got 0"),
        (["--model.init_args.train_attack.eps", "-0.1"], r"`eps` must be a finite number >= 0.*-0.1"),
        (["--model.init_args.train_attack.alpha", "-0.1"], r"`alpha` must be a finite number >= 0.*-0.1"),
        (["--model.init_args.train_attack.steps", "0"], r"`steps` must be an integer >= 1, got 0"),
    ],
)
def test_bad_cli_values_fail_before_training_and_write_nothing(tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        fit(config_args(*MAIN_JOB), tmp_path, *override)
    assert not any(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize(
    "override,key,allowed",
    [
        (["--model.init_args.recipe", "madry"], "recipe", "'standard', 'robust', 'ds', 'random', 'selective', "
                                                          "'selective_ds'"),
        (["--model.init_args.eval_attack.norm", "l1"], "norm", "'linf', 'l2'"),
        (["--model.init_args.scoring_mode", "half"], "scoring_mode", "'eval', 'train', 'keep'"),
    ],
)
def test_unknown_choice_is_refused_by_the_parser_naming_the_key_and_the_allowed_values(tmp_path, capsys, override,
                                                                                       key, allowed):
    with pytest.raises(SystemExit) as exit_info:
        fit(config_args(*MAIN_JOB), tmp_path, *override)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f'Parser key "{key}"' in err and f"[{allowed}]. Got value: {override[-1]}" in err
    assert not any(tmp_path.rglob("*.ckpt"))


def test_help_lists_the_allowed_values_of_every_choice(capsys):
    with pytest.raises(SystemExit):
        build_cli(["fit", "--model.help", "lightning_advsel.AdversarialSelectionModule"])
    out = capsys.readouterr().out
    for choices in ("--model.recipe {standard,robust,ds,random,selective,selective_ds}",
                    "--model.attack_score {margin,margin_true,gradmatch,gradmatch_exact,loss,random}",
                    "--model.scheduler_interval {epoch,step}", "--model.scoring_mode {eval,train,keep}",
                    "--model.selection_scope {local,global}", "--model.nonfinite {raise,skip}"):
        assert choices in out


@pytest.mark.parametrize("recipe,p_up", [("robust", 1.0), ("selective", 1.0), ("ds", 0.5)])
def test_cli_without_p_up_takes_the_recipes_default(tmp_path, recipe, p_up):
    # LightningCLI passes the signature default explicitly: None must still mean the recipe's own default.
    # The digits base sets no p_up (the recipe overlays do).
    base = config_args("digits/base.yaml")
    cli = build_cli([*base, "--model.init_args.recipe", recipe, "--trainer.logger", "false"], run=False)
    assert cli.model.p_up == p_up
    explicit = build_cli([*base, "--model.init_args.recipe", recipe, "--model.init_args.p_up", "0.25",
                          "--trainer.logger", "false"], run=False)
    assert explicit.model.p_up == 0.25


def test_missing_data_set_names_the_folder_and_how_to_fetch_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"MNIST was not found under data_dir=.*download: true"):
        build_cli(["fit", *config_args("mnist/base.yaml", "recipes/ds.yaml"),
                   "--data.init_args.data_dir", str(tmp_path / "nowhere"), "--trainer.accelerator", "cpu",
                   "--trainer.logger.init_args.save_dir", str(tmp_path)])


def test_console_script_entry_point_exits_zero_on_help():
    result = subprocess.run(["lightning-advsel", "--help"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "fit" in result.stdout and "validate" in result.stdout and "test" in result.stdout


def test_eval_attack_null_trains_validates_and_reloads_without_robust_evaluation(tmp_path, capsys):
    cli = build_cli(["fit", *config_args(*MAIN_JOB), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                     "--trainer.enable_progress_bar", "false", "--model.init_args.train_attack.steps", "1",
                     "--model.init_args.eval_attack", "null", "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert cli.model.eval_attack is None and "val/acc_robust" not in cli.model.accuracy_keys()
    assert "val/acc_robust" not in cli.trainer.callback_metrics
    out = capsys.readouterr().out
    assert "val accuracy: clean" in out and "robust" not in out.split("val accuracy:")[1].splitlines()[0]
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["eval_attack"] is None
    assert AdversarialSelectionModule.load_from_checkpoint(ckpt).eval_attack is None


def test_a_margin_validation_attack_is_set_from_the_command_line_and_survives_the_checkpoint(tmp_path):
    no_log = ["--trainer.logger", "false"]
    cli = build_cli([*config_args("mnist/base.yaml", "recipes/ds.yaml"), *no_log,
                     "--model.init_args.eval_attack.loss", "margin"], run=False)
    assert cli.model.eval_attack.loss == "margin" and cli.model.settings.train_attack.loss == "ce"
    assert cli.model.eval_attack.describe().endswith("loss=margin")
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": cli.model.state_dict(), "hyper_parameters": dict(cli.model.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    assert AdversarialSelectionModule.load_from_checkpoint(path).eval_attack.loss == "margin"


def test_eval_attack_auto_is_the_default_and_fit_help_shows_it(capsys):
    no_eval = ["--model.init_args.eval_attack", "auto", "--trainer.logger", "false"]
    cli = build_cli([*config_args("mnist/base.yaml", "recipes/ds.yaml"), *no_eval], run=False)
    assert (cli.model.eval_attack.eps, cli.model.eval_attack.steps, cli.model.eval_attack.alpha) == (0.3, 20, 0.01)
    with pytest.raises(SystemExit) as fit_help:
        main(["fit", "--help"])
    assert fit_help.value.code == 0 and "--model.help" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_cli(["fit", "--model.help", "lightning_advsel.AdversarialSelectionModule"])
    assert "--model.eval_attack" in capsys.readouterr().out


def test_eps_and_alpha_are_read_as_the_field_writes_them_from_yaml_and_the_command_line(tmp_path):
    overlay = tmp_path / "eps.yaml"
    overlay.write_text("model:\n  init_args:\n    train_attack:\n      eps: 8/255\n      alpha: 2/255\n")
    cli = build_cli([*config_args("cifar10/base.yaml", "recipes/ds.yaml"), "--config", str(overlay),
                     "--model.init_args.eval_attack.eps", "8/255", "--model.init_args.test_attack", "AutoAttackConfig",
                     "--model.init_args.test_attack.eps", "8 / 255", "--trainer.logger", "false"], run=False)
    train = cli.model.settings.train_attack
    assert train.eps == 8 / 255 and train.alpha == 2 / 255 and type(train.eps) is float
    assert cli.model.eval_attack.eps == 8 / 255 and cli.model.test_attack.eps == 8 / 255
    assert cli.model.hparams["train_attack"]["eps"] == 8 / 255  # stored as a plain number


@pytest.mark.parametrize("value", ["8/2x55", "eight", "8/0", "8//255"])
def test_an_eps_that_is_not_a_number_or_a_fraction_is_refused_by_the_parser(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        fit(config_args(*MAIN_JOB), tmp_path, "--model.init_args.train_attack.eps", value)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "eps" in err and value in err
    assert not any(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("damage", ["truncated", "not a checkpoint"])
def test_a_damaged_checkpoint_is_refused_naming_the_file_before_any_work(tmp_path, damage):
    cli = fit(config_args(*MAIN_JOB), tmp_path / "run", "--trainer.max_epochs", "1")
    good = Path(cli.trainer.checkpoint_callback.last_model_path)
    bad = tmp_path / "bad.ckpt"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"plain text, not a checkpoint")
    with pytest.raises(ValueError, match=rf"`ckpt_path` '{bad}' is not a readable checkpoint"):
        build_cli(["validate", *config_args(*MAIN_JOB), "--ckpt_path", str(bad), "--trainer.logger", "false",
                   "--trainer.default_root_dir", str(tmp_path)])
    # The intact checkpoint still validates.
    build_cli(["validate", *config_args(*MAIN_JOB), *TINY, "--ckpt_path", str(good), "--trainer.logger", "false",
               "--trainer.default_root_dir", str(tmp_path)])


@pytest.mark.parametrize("given,expected", [("1", 1), ("5", 5), ("1.0", 1.0), ("0.25", 0.25)])
def test_a_batch_limit_given_as_an_int_is_a_count_of_batches(tmp_path, given, expected):
    # Lightning: an int counts batches, a float is a fraction; 1 must not become 1.0 (all batches).
    yaml_file = tmp_path / "limits.yaml"
    yaml_file.write_text(f"trainer:\n  limit_test_batches: {given}\n")
    cli = build_cli([*config_args(*MAIN_JOB), "--config", str(yaml_file), "--trainer.limit_val_batches", given,
                     "--trainer.logger", "false"], run=False)
    for value in (cli.trainer.limit_val_batches, cli.trainer.limit_test_batches):
        assert value == expected and type(value) is type(expected)
