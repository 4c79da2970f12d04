"""The package as a release: configs found by name from any folder, and the built wheel alone running the README's
main job in a fresh virtual environment (the manual and its API reference: ``tests/test_docs.py``)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

from lightning_advsel import shipped_configs
from lightning_advsel.cli import build_cli, main

SHORT_RUN = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
             "--trainer.enable_progress_bar", "false", "--model.init_args.train_attack.steps", "1",
             "--model.init_args.eval_attack.steps", "1"]


def readme_main_job() -> list[str]:
    """The README quick start's main-job command, as words (``lightning-advsel fit -c ...``)."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    command = block.split("&&", 1)[1]
    assert command.split()[:2] == ["lightning-advsel", "fit"], command
    return shlex.split(command)


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


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.slow
def test_the_built_wheel_alone_runs_the_readme_main_job_in_a_fresh_environment(tmp_path):
    (version,) = re.findall(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    dist = tmp_path / "dist"
    # No isolation: the build backend already installed here is used, so no package index is needed.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(REPO)], tmp_path, env)
    (wheel,) = dist.glob(f"lightning_advsel-{version}-*.whl")
    (sdist,) = dist.glob(f"lightning_advsel-{version}.tar.gz")
    with zipfile.ZipFile(wheel) as archive:
        members = archive.namelist()
    assert f"lightning_advsel-{version}.dist-info/licenses/LICENSE" in members
    assert {f"lightning_advsel/configs/{name}.yaml" for name in shipped_configs.names()} <= set(members)
    with tarfile.open(sdist) as archive:
        root = f"lightning_advsel-{version}"
        assert {f"{root}/LICENSE", f"{root}/CHANGELOG.md", f"{root}/lightning_advsel/configs/digits/base.yaml"} <= set(
            archive.getnames())

    # Dependencies come from this interpreter's site-packages; the package itself only from the wheel.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], tmp_path, env)
    python, cli = venv / "bin" / "python", venv / "bin" / "lightning-advsel"
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", "--quiet", str(wheel)],
         tmp_path, env)
    work = tmp_path / "work"  # outside the repository: no configs/ folder here
    work.mkdir()
    imported = _run([str(python), "-c", "import lightning_advsel as p; print(p.__file__); print(p.__version__)"],
                    work, env).split()
    assert Path(imported[0]).is_relative_to(venv) and imported[1] == version

    out = _run([str(cli), *readme_main_job()[1:], *SHORT_RUN], work, env)
    assert "val accuracy: clean" in out and "training cost:" in out
    assert list((work / "lightning_logs" / "digits" / "ds").rglob("last.ckpt"))
