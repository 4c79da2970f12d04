"""Composed configs: every combination the manual's recipe table ships parses and builds, named after its files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import MAIN_JOB, REPO, config_args

from lightning_advsel import AdversarialSelectionModule
from lightning_advsel.cli import build_cli, run_name

CONFIG_DIR = REPO / "configs"
DATA_SETS = sorted(p.parent.name for p in CONFIG_DIR.glob("*/base.yaml"))
RECIPES = sorted(p.stem for p in (CONFIG_DIR / "recipes").glob("*.yaml"))


def manual_table() -> dict[str, list[str]]:
    """Run name (``<data set>/<recipe>``) -> its ``--config`` files, from the recipe table of the manual's page
    "Recipes and configs" (``docs/recipes.md``)."""
    text = (REPO / "docs" / "recipes.md").read_text()
    section = text.split("## Every recipe on every data set", 1)[1].split("\n## ", 1)[0]
    combos = {}
    for line in section.splitlines():
        if line.startswith("| `") and ".yaml`" in line.split("|")[1]:
            for name in re.findall(r"`([a-z0-9_]+/[a-z0-9_]+)`", line):
                data_set, recipe = name.split("/")
                combos[name] = [f"{data_set}/base.yaml", f"recipes/{recipe}.yaml"]
    return combos


SHIPPED = manual_table()


def test_the_manual_table_lists_every_recipe_on_every_data_set():
    assert DATA_SETS == ["cifar10", "digits", "mnist"]
    assert {"ds", "ds_adaptive", "selective_margin", "selective_gradmatch", "selective_ds", "stability"} < set(RECIPES)
    assert sorted(SHIPPED) == sorted(f"{d}/{r}" for d in DATA_SETS for r in RECIPES)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_combination_parses_and_instantiates(name, tmp_path, monkeypatch):
    # Instantiating a data module reads no files (they are opened in setup), so MNIST/CIFAR-10 need no data.
    monkeypatch.chdir(tmp_path)
    cli = build_cli([*config_args(*SHIPPED[name]), "--trainer.accelerator", "cpu"], run=False)
    assert isinstance(cli.model, AdversarialSelectionModule)
    assert cli.datamodule is not None
    # The run is named after what was combined, under lightning_logs/ in the working directory.
    assert cli.trainer.logger.name == name
    assert Path(cli.trainer.logger.save_dir) == Path("lightning_logs")
    if cli.model.settings.recipe.startswith("selective"):
        assert 0 < cli.model.settings.attack_frac <= 1
    if not name.startswith("digits"):
        # Against robust overfitting: the most robust epoch is kept, and a second callback keeps last.ckpt.
        best, latest = cli.trainer.checkpoint_callbacks[:2]
        assert (best.monitor, best.mode, best.save_last) == ("val/acc_robust", "max", None)
        assert (latest.monitor, latest.save_top_k, latest.filename) == (None, 1, "last")


def test_run_name_labels_the_base_by_its_folder_and_skips_callback_and_trainer_overlays():
    files = [CONFIG_DIR / f for f in (*MAIN_JOB, "trainer/ddp_cpu.yaml")]
    assert run_name(files) == "digits/ds"
    assert run_name([Path("my_experiment.yaml")]) == "my_experiment"
    assert run_name([CONFIG_DIR / "callbacks" / "dashboards.yaml"]) is None


def test_an_explicit_run_name_or_logger_wins_over_the_derived_one(tmp_path):
    named = build_cli([*config_args(*MAIN_JOB), "--trainer.logger.init_args.name", "mine"], run=False)
    assert named.trainer.logger.name == "mine"
    overlay = tmp_path / "named.yaml"
    overlay.write_text("trainer:\n  logger:\n    init_args:\n      name: from_file\n")
    from_file = build_cli([*config_args(*MAIN_JOB), "--config", str(overlay)], run=False)
    assert from_file.trainer.logger.name == "from_file"
    assert build_cli([*config_args(*MAIN_JOB), "--trainer.logger", "false"], run=False).trainer.logger is None


def test_overlays_append_their_callbacks_after_the_bases(tmp_path):
    # `callbacks+:` in an overlay appends; the base's checkpointing stays, the recipe's callbacks come first.
    cli = build_cli(config_args("digits/base.yaml", "recipes/ds_adaptive.yaml", "callbacks/dashboards.yaml"),
                    run=False)
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    expected = ["AdaptivePUp", "SelectionMakeup", "MinimumPerturbation", "PaperFigures", "ModelCheckpoint"]
    assert [n for n in names if n in expected] == expected  # Lightning moves ModelCheckpoint last
    assert cli.model.p_up == 1.0


@pytest.mark.parametrize("data_set", DATA_SETS)
def test_the_stability_pair_shares_one_profile_path_per_data_set(data_set):
    first = build_cli(config_args(f"{data_set}/base.yaml", "recipes/stability_profile.yaml"), run=False)
    second = build_cli(config_args(f"{data_set}/base.yaml", "recipes/stability.yaml"), run=False)
    (profile,) = [c for c in first.trainer.callbacks if type(c).__name__ == "StabilityProfile"]
    expected = f"lightning_logs/{data_set}/stability_profile/stability_profile.json"
    assert Path(profile.path) == Path(expected) and second.datamodule.subset_file == expected
    assert first.datamodule.return_index and second.datamodule.subset_fraction == 0.5


def test_data_set_field_without_a_base_config_is_refused(tmp_path):
    full = tmp_path / "full.yaml"
    full.write_text((CONFIG_DIR / "digits" / "base.yaml").read_text())
    with pytest.raises(ValueError, match=r"names \{data_set\}.*no --config file is a base.yaml"):
        build_cli(["--config", str(full), *config_args("recipes/stability.yaml")], run=False)


@pytest.mark.parametrize("data_set", ["mnist", "cifar10"])
def test_last_ckpt_is_the_latest_epoch_even_when_the_best_robust_epoch_is_earlier(data_set, tmp_path):
    import lightning as L
    import torch
    import yaml

    # The data set's checkpoint callbacks on the digits job, with a learning rate of 0 and a deterministic
    # evaluation attack: validation robust accuracy is the same at every epoch, so the best epoch stays the first.
    callbacks = [cb for cb in yaml.safe_load((CONFIG_DIR / data_set / "base.yaml").read_text())["trainer"]["callbacks"]
                 if cb["class_path"].endswith("ModelCheckpoint")]
    overlay = tmp_path / "callbacks.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    args = [*config_args(*MAIN_JOB[:2]), "--config", str(overlay),
            "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger", "false", "--model.init_args.optimizer.init_args.lr", "0.0",
            "--model.init_args.eval_attack.random_start", "false", "--trainer.max_epochs", "3"]
    cli = build_cli(args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    best = next(cb for cb in cli.trainer.checkpoint_callbacks if cb.monitor == "val/acc_robust")
    assert torch.load(best.best_model_path, weights_only=False)["epoch"] == 0
    # --ckpt_path last resumes after the latest epoch (2), not after the best (0).
    resumed = build_cli(args[:-2] + ["--trainer.max_epochs", "4"], run=False)
    starts = []
    resumed.trainer.callbacks.append(L.Callback())
    resumed.trainer.callbacks[-1].on_train_start = lambda trainer, module: starts.append(trainer.current_epoch)
    resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path="last")
    assert starts == [3]


@pytest.mark.parametrize("overlay,network,size", [("preact_resnet18", "PreActResNet18", 11_172_170),
                                                  ("wrn34_10", "WideResNet", 46_160_474),
                                                  ("wrn28_10", "WideResNet", 36_479_194)])
def test_a_network_overlay_selects_its_network_after_the_cifar10_base(overlay, network, size, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli([*config_args("cifar10/base.yaml", f"models/{overlay}.yaml", "recipes/robust.yaml"),
                     "--trainer.accelerator", "cpu"], run=False)
    net = cli.model.model
    assert type(net).__name__ == network and sum(p.numel() for p in net.parameters()) == size
    assert cli.trainer.logger.name == f"cifar10/{overlay}/robust"
    assert cli.model.settings.train_attack.eps == pytest.approx(8 / 255, abs=1e-4)  # the base's, unchanged
