"""The callbacks on two CPU ranks (ddp_spawn, gloo) log what one process logs over the same data."""

from __future__ import annotations

import json

import pytest
from conftest import run_spawned_script
from ddp_callbacks_run import BATCH, PROBE, WORLD, run


@pytest.mark.slow
def test_two_ranks_log_the_sums_and_the_probe_distribution_of_one_process(tmp_path):
    run_spawned_script("ddp_callbacks_run.py", tmp_path, WORLD)
    run(str(tmp_path), 1)
    ranks = [json.loads((tmp_path / f"rank{r}_devices{WORLD}.json").read_text()) for r in range(WORLD)]
    single = json.loads((tmp_path / "rank0_devices1.json").read_text())

    # The probe is split across ranks, not repeated: shards of 8 and 7 of the 15 samples.
    assert [r["probe_shard"] for r in ranks] == [8, 7] and single["probe_shard"] == PROBE
    for rank in ranks:
        assert rank["p_up"] == single["p_up"] and len(set(single["p_up"])) == 2
        assert rank["accs"] == single["accs"]
        assert rank["makeup"] == single["makeup"]
        for got, want in zip(rank["minperturb"], single["minperturb"], strict=True):
            assert got["eps"] == want["eps"]  # per-sample radii, gathered back into probe order
            for key in ("minperturb/mean", "minperturb/median", "minperturb/robust_frac_at_train_eps"):
                assert got[key] == pytest.approx(want[key], abs=1e-9)
        # The Fig. 8 counts: each rank pools its own last batch, and the logged counts are the sums.
        last = rank["minperturb"][-1]
        for key in rank["fig8_local"]:
            assert last[key] == sum(r["fig8_local"][key] for r in ranks), key
        assert last["train_rows"] == WORLD * BATCH and last["selected"] > 0
        assert rank["metrics"]["minperturb/selected_min_adv_frac"] == pytest.approx(
            last["selected_min_adv"] / last["selected"])
        for key in ("train/acc", "val/acc_clean", "val/acc_robust", "selection/n_clean", "selection/n_adv",
                    "train/selected_adv_frac", "minperturb/mean", "minperturb/median"):
            assert rank["metrics"][key] == pytest.approx(single["metrics"][key], abs=1e-6), key
