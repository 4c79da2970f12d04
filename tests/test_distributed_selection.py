"""Selection under two-process DDP on CPU (gloo): global scope equals one process on the concatenated batch.

One launch of ``tests/ddp_worker.py`` trains every case below; the single-process references run here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TinyNet, fit_steps, tiny_batch
from ddp_worker import ATTACK, ROWS, build

from lightning_advsel import AdversarialSelectionModule

pytestmark = pytest.mark.slow
RUNS = ("global:0.25:1", "global:0.03125:2", "local:0.25:1", "global:0.5:-1:nan")
# Largest parameter difference accepted between 2-rank DDP and one process: float32 sums in another order.
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "out.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    result = subprocess.run([sys.executable, str(REPO / "tests" / "ddp_worker.py"), str(out), *RUNS],
                            env=env, capture_output=True, text=True, timeout=240, cwd=out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(out.with_name(f"out.rank{rank}.json").read_text()) for rank in (0, 1)], result.stderr


@pytest.fixture(scope="module")
def ddp_results(ddp_run):
    return ddp_run[0]


def test_epoch_level_logging_is_synced_over_ranks(ddp_run):
    # Lightning warns for every epoch-level value logged without a sync under DDP.
    assert "sync_dist=True" not in ddp_run[1]


def params(module: AdversarialSelectionModule) -> list[torch.Tensor]:
    return [p.detach() for p in module.model.parameters()]


def as_tensors(nested: list) -> list[torch.Tensor]:
    return [torch.tensor(p) for p in nested]


@pytest.mark.parametrize("run", ["global:0.25:1", "global:0.03125:2"])
def test_global_scope_update_equals_one_process_on_the_concatenated_batch(ddp_results, tmp_path, run):
    _, p_up, steps = run.split(":")
    x, y = tiny_batch(ROWS)
    single = build("global", float(p_up))
    fit_steps(single, x, y, tmp_path, steps=int(steps))
    rank0, rank1 = (as_tensors(r[run]["params"]) for r in ddp_results)
    for a, b in zip(rank0, rank1, strict=True):
        assert torch.equal(a, b)  # DDP keeps replicas identical
    diff = max(float((a - b).abs().max()) for a, b in zip(rank0, params(single), strict=True))
    print(f"{run}: max |DDP - single| = {diff:.3g}")
    assert diff <= TOLERANCE, f"max |DDP - single| = {diff}"
    # The rows both ranks selected at the last step (named by single-process pool row) are its selection.
    union = set(ddp_results[0][run]["selected"][-1]) | set(ddp_results[1][run]["selected"][-1])
    assert union == set(single.last_selection.selected.tolist())


def test_a_rank_that_selects_no_row_still_steps_with_the_others(ddp_results):
    counts = [[len(rows) for rows in r["global:0.03125:2"]["selected"]] for r in ddp_results]
    # One row of the 64-row global pool is selected per step, so one rank selects none each step.
    assert [a + b for a, b in zip(*counts, strict=True)] == [1, 1]
    assert 0 in counts[0] + counts[1]


def test_local_scope_averages_the_per_rank_updates(ddp_results, tmp_path):
    x, y = tiny_batch(ROWS)
    halves = []
    for rank in (0, 1):
        module = build("local", 0.25)
        fit_steps(module, x[rank::2], y[rank::2], tmp_path)
        halves.append(params(module))
    ddp = as_tensors(ddp_results[0]["local:0.25:1"]["params"])
    for got, a, b in zip(ddp, *halves, strict=True):
        torch.testing.assert_close(got, (a + b) / 2, atol=TOLERANCE, rtol=0)
    assert [len(r["local:0.25:1"]["selected"][0]) for r in ddp_results] == [4, 4]


def test_a_nan_batch_on_one_rank_is_skipped_on_both(ddp_results):
    run = "global:0.5:-1:nan"
    # Two batches per rank; the NaN row is in one batch of one rank: both ranks skip that step together.
    for rank in ddp_results:
        assert rank[run]["skipped_steps"] == 1 and rank[run]["optimizer_steps"] == 1
        assert all(math.isfinite(v) for p in rank[run]["params"] for v in torch.tensor(p).flatten().tolist())
    assert ddp_results[0][run]["params"] == ddp_results[1][run]["params"]


@pytest.mark.parametrize("run", RUNS)
def test_the_attack_fires_no_gradient_all_reduce(ddp_results, run):
    for rank in ddp_results:
        # The PGD loop takes 2 input-gradient steps per training step; only the update all-reduces.
        assert rank[run]["allreduce_calls"] == rank[run]["optimizer_steps"] > 0
    assert ATTACK.steps == 2


@pytest.mark.parametrize("run", RUNS)
def test_the_input_checks_cost_one_collective_before_the_attack(ddp_results, run):
    for rank in ddp_results:
        # Finite inputs and labels in range, agreed over both ranks in one all-reduce.
        assert rank[run]["collectives_before_attack"] == [1] * rank[run]["optimizer_steps"]


def test_a_local_scope_step_makes_one_collective_after_its_attack(ddp_results):
    run = "local:0.25:1"
    for rank in ddp_results:
        # Besides the gradient all-reduce: the finite-loss decision and the step's work for the cost log, together.
        assert rank[run]["collectives_after_attack"] == [1] * rank[run]["optimizer_steps"]


def test_global_scope_refuses_syncbatchnorm_at_fit_start(tmp_path):
    net = TinyNet()
    net.net.insert(1, torch.nn.SyncBatchNorm(64))
    module = AdversarialSelectionModule(net, recipe="ds", p_up=0.5, selection_scope="global")
    x, y = tiny_batch(ROWS)
    with pytest.raises(ValueError, match=r"`selection_scope`='global'.*SyncBatchNorm"):
        fit_steps(module, x, y, tmp_path)
