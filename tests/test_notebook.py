"""The notebooks run top to bottom (with a short schedule) and print their comparison tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO


def run_notebook(name: str, tmp_path, monkeypatch) -> dict:  # noqa: ANN001
    """Execute the code cells of ``notebooks/<name>`` in order, for 1 epoch, logging under ``tmp_path``."""
    monkeypatch.setenv("ADVSEL_NOTEBOOK_EPOCHS", "1")
    monkeypatch.setenv("ADVSEL_NOTEBOOK_LOGS", str(tmp_path))
    notebook = json.loads((REPO / "notebooks" / name).read_text())
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), name, "exec"), namespace)
    return namespace


@pytest.mark.slow
def test_quickstart_notebook_runs_and_compares_the_four_recipes(tmp_path, monkeypatch, capsys):
    namespace = run_notebook("quickstart.ipynb", tmp_path, monkeypatch)
    results = {r["recipe"]: r for r in namespace["results"]}
    assert set(results) == {"standard", "robust", "ds", "random"}
    assert results["standard"]["adv share of backpropagated"] == 0.0
    assert results["robust"]["adv share of backpropagated"] == 1.0
    assert all(0 <= r["robust"] <= 1 and 0 <= r["clean"] <= 1 for r in results.values())
    assert "recipe" in capsys.readouterr().out
    assert any(tmp_path.rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_dropin_notebook_trains_the_users_model_and_data_with_the_step_and_with_the_module(tmp_path, monkeypatch,
                                                                                          capsys):
    namespace = run_notebook("dropin.ipynb", tmp_path, monkeypatch)
    # The notebook's own model and data module, not the package's.
    assert not any(namespace[c].__module__.startswith("lightning_advsel") for c in ("DigitsMLP", "DigitsTensors"))
    results = {r["run"]: r for r in namespace["results"]}
    assert set(results) == {"functional_core", "packaged_module"}
    for r in results.values():
        # p_up = 0.5 of every pool of b clean + b adversarial rows (pools are even, so exactly half).
        assert r["backpropagated share of pool"] == 0.5
        assert 0 < r["adv share of backpropagated"] < 1
        assert 0 <= r["clean"] <= 1 and 0 <= r["robust"] <= 1
        assert any(Path(r["log_dir"]).glob("events.out.tfevents.*"))
        assert {p.name for p in r["figures"]} >= {"accuracy.png", "selection_makeup.png"}
    # One epoch of DS training lifts the MLP from chance (0.1) on clean validation digits.
    assert results["functional_core"]["clean"] > 0.5
    assert "backprop share" in capsys.readouterr().out
