"""The package as a release: configs found by name from any folder."""

from __future__ import annotations

import re

import pytest
from conftest import REPO

from lightning_advsel import shipped_configs
from lightning_advsel.cli import build_cli, main


def test_the_repository_configs_folder_is_the_shipped_one():
    # One copy: the top-level folder the README and benchmarks name is the package's own.
    assert (REPO / "configs").resolve() == shipped_configs.CONFIG_DIR
    assert sorted(p.relative_to(REPO / "configs").with_suffix("").as_posix()
                  for p in (REPO / "configs").rglob("*.yaml")) == shipped_configs.names()


def test_configs_given_by_name_from_another_folder_build_the_same_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: every name is the shipped file
    by_name = build_cli(["-c", "digits/base", "--config=recipes/ds.yaml", "-c", "configs/callbacks/dashboards.yaml"],
                        run=False)
    by_path = build_cli([arg for name in ("digits/base", "recipes/ds", "callbacks/dashboards")
                         for arg in ("-c", str(REPO / "configs" / f"{name}.yaml"))], run=False)
    assert by_name.trainer.logger.name == by_path.trainer.logger.name == "digits/ds"
    assert by_name.model.hparams == by_path.model.hparams
    assert [type(c) for c in by_name.trainer.callbacks] == [type(c) for c in by_path.trainer.callbacks]


def test_a_file_at_the_given_path_wins_over_the_shipped_config_of_that_name(tmp_path, monkeypatch):
    mine = tmp_path / "configs" / "recipes" / "ds.yaml"
    mine.parent.mkdir(parents=True)
    mine.write_text("model:\n  init_args:\n    recipe: ds\n    p_up: 0.25  # fraction of the pool backpropagated\n")
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["-c", "configs/digits/base.yaml", "-c", "configs/recipes/ds.yaml", "--trainer.logger", "false"],
                    run=False)
    assert cli.model.p_up == 0.25


def test_an_unknown_config_is_refused_naming_it_and_the_closest_shipped_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"`--config` 'recipes/dss' is neither a file nor a shipped config; "
                                                r"did you mean recipes/ds, "):
        build_cli(["fit", "-c", "digits/base", "-c", "recipes/dss", "--trainer.logger.init_args.save_dir",
                   str(tmp_path)])
    with pytest.raises(FileNotFoundError, match=r"'selective_margn'.*recipes/selective_margin"):
        build_cli(["-c", "digits/base", "-c", "selective_margn"], run=False)
    assert not any(tmp_path.iterdir())  # refused before any work


def test_configs_command_lists_every_shipped_config_and_prints_one(capsys):
    main(["configs"])
    listing = capsys.readouterr().out
    for path in (REPO / "configs").rglob("*.yaml"):
        name = path.relative_to(REPO / "configs").with_suffix("").as_posix()
        summary = path.read_text().splitlines()[0].removeprefix("#").strip()
        assert re.search(rf"^{name} +{re.escape(summary)}$", listing, re.MULTILINE), name
    main(["configs", "recipes/ds"])
    assert capsys.readouterr().out == (REPO / "configs" / "recipes" / "ds.yaml").read_text()
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "digits/base, mnist/base" in " ".join(capsys.readouterr().out.split())
