"""Selection under two-process DDP on CPU (gloo): global scope equals one process on the concatenated batch.

One launch of ``tests/ddp_worker.py`` trains every case below; the single-process references run here.
"""

from __future__ import annotations

import json
import math
import sys

import lightning as L
import pytest
import torch
from conftest import REPO, TinyNet, fit_steps, run_ranks, tiny_batch
from ddp_worker import ATTACK, ROWS, SaveAfterFirstBatch, build, rank_rows
from torch.utils.data import DataLoader, TensorDataset

from lightning_advsel import AdversarialSelectionModule

pytestmark = pytest.mark.slow
RUNS = ("global:0.25:1", "global:0.03125:2", "local:0.25:1", "global:0.5:-1:nan", "local:0.25:1:compiled")
# Accumulation over 2 batches of 2 rows per rank; the second has a window whose closing batch holds a NaN row.
ACC_RUNS = ("global:0.5:2:acc2", "global:0.5:-1:nan:acc2")
# Largest parameter difference accepted between 2-rank DDP and one process: float32 sums in another order.
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "out.json"
    output = run_ranks([sys.executable, str(REPO / "tests" / "ddp_worker.py"), str(out), *RUNS, *ACC_RUNS,
                        "bn_window"], out.parent, 240, "2-rank DDP selection runs")
    results = [json.loads(out.with_name(f"out.rank{rank}.json").read_text()) for rank in (0, 1)]
    return results, output, out.parent


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


def test_the_compiled_attack_trains_under_ddp_as_the_eager_one(ddp_results):
    """compile_attack: the attack's graph takes detached parameters, so the update's backward still runs on the real
    ones through DDP (one gradient all-reduce a step, as the tests above count for every run) and the step's
    weights equal the eager attack's on the same batches, within float32 summation noise."""
    for rank in ddp_results:
        # The attack ran as its graph (one PGD step replayed ATTACK.steps times), never eagerly.
        assert rank["local:0.25:1:compiled"]["attack_graph_calls"] >= 1
        assert rank["local:0.25:1:compiled"]["attack_eager_calls"] == 0
        assert rank["local:0.25:1:compiled"]["selected"] == rank["local:0.25:1"]["selected"]
        compiled, eager = (as_tensors(rank[run]["params"]) for run in ("local:0.25:1:compiled", "local:0.25:1"))
        for got, want in zip(compiled, eager, strict=True):
            torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=0)


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


def accumulating_in_one_process(run: str, tmp_path) -> tuple[AdversarialSelectionModule, L.Trainer, dict]:  # noqa: ANN001
    """The one-process reference of an ``accN`` run: batches of 4 rows, each the union of the two ranks' 2-row
    batches; returns the module, its trainer and the checkpoint saved after the first batch."""
    scope, p_up, steps, *options = run.split(":")
    x, y = tiny_batch(ROWS)
    if "nan" in options:
        x, y = torch.cat([x, x]), y.repeat(2)
        x[rank_rows(len(x), 1)[2], 0, 3, 3] = float("nan")
    ranks = [rank_rows(len(x), rank) for rank in (0, 1)]
    order = [i for k in range(0, len(ranks[0]), 2) for rows in ranks for i in rows[k:k + 2]]
    x, y = x[order], y[order]
    module = build(scope, float(p_up), "skip" if "nan" in options else "raise", accumulate=2)
    ckpt = tmp_path / "single.ckpt"
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_steps=int(steps), max_epochs=1 if "nan" in options else None,
        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, callbacks=[SaveAfterFirstBatch(ckpt)])
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False))
    return module, trainer, torch.load(ckpt, weights_only=True)


def assert_same_update(ddp_results, run: str, single: AdversarialSelectionModule) -> None:  # noqa: ANN001
    rank0, rank1 = (as_tensors(r[run]["params"]) for r in ddp_results)
    for a, b in zip(rank0, rank1, strict=True):
        assert torch.equal(a, b)
    diff = max(float((a - b).abs().max()) for a, b in zip(rank0, params(single), strict=True))
    assert diff <= TOLERANCE, f"{run}: max |DDP - single| = {diff}"


def test_accumulation_under_ddp_all_reduces_once_per_window_and_equals_one_process(ddp_results, tmp_path):
    run = ACC_RUNS[0]
    single, trainer, _ = accumulating_in_one_process(run, tmp_path)
    assert_same_update(ddp_results, run, single)
    for rank in ddp_results:
        # Four batches per rank in two windows: only each window's closing backward all-reduces (DDP's no_sync).
        assert rank[run]["batches_trained"] == 4
        assert rank[run]["allreduce_calls"] == rank[run]["optimizer_steps"] == trainer.global_step == 2


def test_a_window_whose_closing_batch_is_skipped_still_steps_on_the_rank_average(ddp_results, tmp_path):
    run = ACC_RUNS[1]
    single, trainer, _ = accumulating_in_one_process(run, tmp_path)
    assert single.skipped_steps == 1
    assert_same_update(ddp_results, run, single)
    for rank in ddp_results:
        # Eight batches per rank in four windows; the second window's closing batch (a NaN row) is skipped, so
        # its first batch's gradients are averaged by the module instead of by DDP's backward all-reduce.
        assert rank[run]["skipped_steps"] == 1
        assert rank[run]["optimizer_steps"] == trainer.global_step == 4
        assert rank[run]["allreduce_calls"] == 3


def test_a_checkpoint_inside_a_window_under_ddp_holds_the_gradients_averaged_over_ranks(ddp_run, tmp_path):
    run = ACC_RUNS[0]
    _, _, single = accumulating_in_one_process(run, tmp_path)
    ddp = torch.load(ddp_run[2] / f"{run.replace(':', '_')}.ckpt", weights_only=True)
    # After one unsynced backward each rank holds only its own gradients; the checkpoint (written by rank 0) must
    # hold their average, the gradients of the one-process window, so that a resumed run steps as this one did.
    saved, expected = (c["advsel"]["accumulation"]["grads"] for c in (ddp, single))
    assert ddp["advsel"]["accumulation"]["window_batches"] == 1 and saved is not None
    for got, want in zip(saved, expected, strict=True):
        torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=0)


def test_every_rank_evaluates_with_rank_zeros_batchnorm_statistics(ddp_run):
    """Lightning's manual optimization keeps DDP from broadcasting buffers at a forward, so without the module's
    own broadcast each rank validated and tested with running statistics of its own batches only (measured: up
    to 0.11 apart in this run), also inside an accumulation window, where the backward ran under ``no_sync``."""
    logged = [json.loads((ddp_run[2] / f"bn_window.rank{rank}.json").read_text()) for rank in (0, 1)]
    rank0, rank1 = (rank["seen"] for rank in logged)
    # Four training batches of 4 rows per rank, a validation after each, then the test.
    assert [s["stage"] for s in rank0] == ["validate"] * 4 + ["test"]
    assert [s["window_open"] for s in rank0[:4]] == [True, False] * 2
    for seen0, seen1 in zip(rank0, rank1, strict=True):
        assert seen0["running_mean"] == seen1["running_mean"], seen0["stage"]
    assert rank0[0]["running_mean"] != rank0[-1]["running_mean"]  # the statistics did move in training
    # The clean loss is the mean over both ranks' rows, as the accuracies are: the same number on each rank
    # (each rank's own mean differed before it was a metric, and Lightning warned, which the test above checks).
    assert logged[0]["loss_clean"] == logged[1]["loss_clean"]
