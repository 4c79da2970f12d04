"""Composed configs: every combination the README's recipe table ships parses and builds, named after its files."""

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


def readme_table() -> dict[str, list[str]]:
    """Run name (``<data set>/<recipe>``) -> its ``--config`` files, from the README's recipe table."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Recipes and configs", 1)[1].split("\n## ", 1)[0]
    combos = {}
    for line in section.splitlines():
        if line.startswith("| `") and ".yaml`" in line.split("|")[1]:
            for name in re.findall(r"`([a-z0-9_]+/[a-z0-9_]+)`", line):
                data_set, recipe = name.split("/")
                combos[name] = [f"{data_set}/base.yaml", f"recipes/{recipe}.yaml"]
    return combos


SHIPPED = readme_table()


def test_the_readme_table_lists_every_recipe_on_every_data_set():
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
        # Against robust overfitting: the most robust epoch is kept besides last.ckpt.
        checkpoint = cli.trainer.checkpoint_callback
        assert (checkpoint.monitor, checkpoint.mode, checkpoint.save_last) == ("val/acc_robust", "max", True)


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
