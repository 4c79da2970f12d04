"""Every shipped YAML config parses and builds its trainer, model and data module, without training."""

from __future__ import annotations

import pytest
from conftest import REPO

from lightning_advsel import AdversarialSelectionModule
from lightning_advsel.cli import build_cli

CONFIG_DIR = REPO / "configs"
CONFIGS = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if "trainer" not in p.relative_to(CONFIG_DIR).parts)


def test_the_config_list_holds_the_selective_configs_of_every_data_set():
    names = {str(p.relative_to(CONFIG_DIR)) for p in CONFIGS}
    for kind in ("margin", "gradmatch", "ds"):
        assert f"digits_selective_{kind}.yaml" in names
        assert f"mnist/selective_{kind}.yaml" in names
        assert f"cifar10/selective_{kind}.yaml" in names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_config_parses_and_instantiates(config, tmp_path):
    # Instantiating a data module reads no files (they are opened in setup), so MNIST/CIFAR-10 need no data.
    cli = build_cli(["--config", str(config), "--trainer.logger.init_args.save_dir", str(tmp_path),
                     "--trainer.accelerator", "cpu"], run=False)
    assert isinstance(cli.model, AdversarialSelectionModule)
    assert cli.datamodule is not None
    logger = cli.trainer.logger
    # Logs land under the config's own name: digits_selective_margin.yaml -> digits_selective_margin,
    # mnist/selective_margin.yaml -> mnist_selective_margin.
    parent = config.parent.name
    expected = config.stem if parent == "configs" else f"{parent}_{config.stem}"
    assert logger.name == expected
    if cli.model.settings.recipe.startswith("selective"):
        assert 0 < cli.model.settings.attack_frac <= 1
    if parent in ("mnist", "cifar10"):
        # Against robust overfitting: the most robust epoch is kept besides last.ckpt.
        checkpoint = cli.trainer.checkpoint_callback
        assert (checkpoint.monitor, checkpoint.mode, checkpoint.save_last) == ("val/acc_robust", "max", True)
