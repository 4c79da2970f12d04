"""The manual as users get it: the README's command builds it with warnings as errors, every public name is in its API
reference, every Python example on its pages and in the README runs, and the README's numbers are generated."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch
from conftest import REPO

import lightning_advsel
from lightning_advsel.data import DigitsDataModule
from lightning_advsel.models import SmallCNN

sys.path.insert(0, str(REPO / "benchmarks"))
from report import HEADLINE_END, HEADLINE_START, headline  # noqa: E402

DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md"))
TOOLS = ("sphinx", "furo", "myst_parser")


def readme_build_command() -> list[str]:
    """The README's command that builds the manual (after ``pip install ... &&``), as words."""
    readme = (REPO / "README.md").read_text()
    (line,) = re.findall(r"^pip install -e \"\.\[docs\]\" && (python -m sphinx [^#\n]*)", readme, re.MULTILINE)
    return line.split()


def build(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    missing = [tool for tool in TOOLS if importlib.util.find_spec(tool) is None]
    assert not missing, f"the manual's build tools {missing} are missing: pip install -e '.[test]' installs them"
    return subprocess.run([sys.executable, *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The manual built by the README's command, from scratch (``-E``: every page read again) into a fresh folder."""
    out = tmp_path_factory.mktemp("site")
    words = readme_build_command()
    assert words[:5] == ["python", "-m", "sphinx", "-W", "--keep-going"], words
    result = build([*words[:-1], "-E", str(out)], REPO)
    assert result.returncode == 0, f"the manual's build failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return out


def test_the_readmes_command_builds_every_page_with_warnings_as_errors(site):
    built = {p.relative_to(site).with_suffix("").as_posix() for p in site.rglob("*.html")}
    assert {page.stem for page in PAGES} <= built
    assert {"api/index", "api/lightning_advsel", "api/lightning_advsel.step", "api/lightning_advsel.callbacks"} <= built
    index = (site / "index.html").read_text()
    assert "What it buys, measured" in index and "mnist_pareto.png" in index  # the README's front part
    # The Markdown pages' inline code that names a documented object links to its entry in the reference.
    own = (site / "own-project.html").read_text()
    assert re.search(r'href="api/lightning_advsel\.step\.html#lightning_advsel\.step\.adversarial_step"', own)


def _public_names(module) -> list[str]:  # noqa: ANN001
    """What a user may import from ``module``: its ``__all__``, else the classes and functions it defines."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [name for name, obj in vars(module).items() if not name.startswith("_")
            and (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ == module.__name__]


def _resolve(name: str) -> object:
    try:
        return pkgutil.resolve_name(name)
    except (ImportError, AttributeError, ValueError):
        return None


def test_every_public_name_of_the_package_is_in_the_api_reference(site):
    from sphinx.util.inventory import InventoryFile

    with open(site / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", os.path.join)
    documented = {name for kind, entries in inventory.items() if kind.startswith("py:") for name in entries}
    modules = [lightning_advsel, *(importlib.import_module(m.name) for m in pkgutil.walk_packages(
        lightning_advsel.__path__, "lightning_advsel.") if not any(p.startswith("_") for p in m.name.split(".")))]
    missing = []
    for module in modules:
        assert module.__name__ in documented, module.__name__
        for name in _public_names(module):
            obj = getattr(module, name)
            defined = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
            homes = {f"{module.__name__}.{name}", defined}
            # A re-exported value (a dict of recipes) is documented where it is defined.
            homes |= {entry for entry in documented if entry.endswith(f".{name}")
                      and _resolve(entry) is obj} if not homes & documented else set()
            if not homes & documented:
                missing.append(f"{module.__name__}.{name}")
    assert not missing, f"public names missing from the API reference: {missing}"


def test_a_docstring_reference_or_a_link_to_nothing_fails_the_build(tmp_path):
    # The manual's own configuration on a one-module package: a stale docstring reference and a broken link.
    source = tmp_path / "src"
    source.mkdir()
    stale = '"""A module."""\n\n\ndef scored():\n    """Like :func:`renamed_long_ago`."""\n'
    (tmp_path / "stale_refs.py").write_text(stale)
    (source / "index.md").write_text("# Stale\n\nSee [the scores](scores.md#best).\n\n```{toctree}\napi/index\n```\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-c", str(DOCS),
                             "-D", "apiref_package=stale_refs", str(source), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode != 0
    assert re.search(r"stale_refs\.scored.*reference target not found: renamed_long_ago", result.stderr), result.stderr
    assert "cross-reference target not found: 'scores.md#best'" in result.stderr


# ------------------------------------------------------------------------------------------- the pages' examples

def python_examples(path: Path) -> list[str]:
    """The ```python blocks of a Markdown page, in order."""
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.MULTILINE | re.DOTALL)


EXAMPLES = [p for p in [REPO / "README.md", *PAGES] if python_examples(p)]
SHORT = {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "num_sanity_val_steps": 0,
         "limit_test_batches": 1, "limit_predict_batches": 1, "enable_progress_bar": False,
         "enable_model_summary": False, "logger": False, "enable_checkpointing": False}


class MyNet(SmallCNN):
    """The reader's network in the examples: a small CNN for 8x8 digits."""

    def __init__(self) -> None:
        super().__init__(width=8, hidden=32)


def placeholders() -> dict:
    """What the examples call the reader's own objects (``my_net``, ``my_datamodule``, ``x``): a small network and
    scikit-learn's digits, which need no download."""
    datamodule = DigitsDataModule(batch_size=8)
    datamodule.setup("test")
    x, _ = next(iter(datamodule.test_dataloader()))[:2]
    return {"MyNet": MyNet, "my_net": MyNet(), "my_datamodule": datamodule, "x": x}


@pytest.mark.parametrize("page", EXAMPLES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_the_python_examples_of_each_page_run_in_order(page, tmp_path, monkeypatch):
    # A short budget whatever the example asks: every Trainer the examples build trains two batches for one epoch.
    real = lightning.Trainer
    monkeypatch.setattr(lightning, "Trainer",
                        lambda **kwargs: real(**{**kwargs, **SHORT, "default_root_dir": tmp_path}))
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = placeholders()
    before = [p.detach().clone() for p in namespace["my_net"].parameters()]
    examples = python_examples(page)
    for number, block in enumerate(examples, 1):
        exec(compile(block, f"{page.name}, example {number}", "exec"), namespace)
    if any(".fit(" in block for block in examples):  # they trained the reader's network, not a copy of it
        assert any(not torch.equal(a, b) for a, b in zip(before, namespace["my_net"].parameters(), strict=True))


# ----------------------------------------------------------------------------------------------------- the README

def test_the_readme_is_a_front_page_with_the_fresh_machine_commands():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert 'pip install -e . && lightning-advsel fit -c configs/digits/base.yaml' in text
    assert 'pip install -e ".[test]" && python -m pytest' in text
    # Its links work on the code host: each relative one names a file or folder of the repository.
    for target in re.findall(r"\]\((?!https?://)([^)#\s]+)", text):
        assert (REPO / target).exists(), target


def test_the_readme_headline_table_is_the_reports_from_the_records():
    text = (REPO / "README.md").read_text()
    block = HEADLINE_START + text.split(HEADLINE_START, 1)[1].split(HEADLINE_END, 1)[0] + HEADLINE_END
    assert block.splitlines() == headline(REPO / "benchmarks" / "records"), \
        "the README's headline differs from the records: python benchmarks/reproduce.py report rewrites it"


def test_every_measured_number_of_the_readme_is_in_the_generated_results():
    text = (REPO / "README.md").read_text()
    generated = text.split(HEADLINE_START, 1)[1].split(HEADLINE_END, 1)[0]
    prose = re.sub(r"```.*?```|`[^`]*`", "", text.replace(generated, ""), flags=re.DOTALL)
    results = (REPO / "benchmarks" / "RESULTS.md").read_text()
    typed = [n for n in re.findall(r"\d+\.\d+|\d+(?:\.\d+)?%", prose) if n.rstrip("%") not in results]
    assert not typed, f"numbers in the README that neither the headline nor RESULTS.md holds: {typed}"
