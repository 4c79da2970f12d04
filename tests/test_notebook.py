"""The notebook runs top to bottom (with a short schedule) and prints its comparison table."""

from __future__ import annotations

import json

import pytest
from conftest import REPO


@pytest.mark.slow
def test_quickstart_notebook_runs_and_compares_the_four_recipes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADVSEL_NOTEBOOK_EPOCHS", "1")
    monkeypatch.setenv("ADVSEL_NOTEBOOK_LOGS", str(tmp_path))
    notebook = json.loads((REPO / "notebooks" / "quickstart.ipynb").read_text())
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), namespace)
    results = {r["recipe"]: r for r in namespace["results"]}
    assert set(results) == {"standard", "robust", "ds", "random"}
    assert results["standard"]["adv share of backpropagated"] == 0.0
    assert results["robust"]["adv share of backpropagated"] == 1.0
    assert all(0 <= r["robust"] <= 1 and 0 <= r["clean"] <= 1 for r in results.values())
    assert "recipe" in capsys.readouterr().out
    assert any(tmp_path.rglob("events.out.tfevents.*"))
