"""The training step's host work: no wait for the device beyond the policy's agreements, and what makes that so
(the step metrics, BatchNorm's buffers during an attack), checked on CPU with benchmarks/host_work.py's counters."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import REPO
from torch import nn
from torchmetrics import MeanMetric

from lightning_advsel.attacks import model_mode
from lightning_advsel.callbacks.selection_makeup import SelectionCounts
from lightning_advsel.metrics import SyncFreeMean
from lightning_advsel.selection import mask_indices
from lightning_advsel.step import build_pool

sys.path.insert(0, str(REPO / "benchmarks"))
import host_work  # noqa: E402


def test_sync_free_mean_is_meanmetrics_weighted_mean_with_its_states_and_no_host_wait():
    ours, theirs = SyncFreeMean(), MeanMetric()
    values = [(torch.tensor(2.5), 3), (torch.tensor([1.0, 4.0]), None), (torch.tensor(7.0), 0),
              (torch.tensor([0.5, 1.5, 2.0]), torch.tensor([1.0, 0.0, 2.0]))]
    waits = host_work.HostWaits()
    with waits:
        for value, weight in values:
            ours.update(value, weight=weight)
    for value, weight in values:
        theirs.update(value, weight=weight)
    assert not waits.sites
    assert torch.allclose(ours.compute(), theirs.compute())
    assert set(ours.metric_state) == set(theirs.metric_state)  # a checkpoint of either loads into the other
    fresh = SyncFreeMean()
    fresh.merge_state(theirs.metric_state)
    assert all(torch.allclose(fresh.metric_state[k], theirs.metric_state[k]) for k in theirs.metric_state)


def test_sync_free_mean_keeps_a_nan_instead_of_dropping_it():
    mean = SyncFreeMean()
    mean.update(torch.tensor(1.0))
    mean.update(torch.tensor(float("nan")))
    assert torch.isnan(mean.compute())


class OwnForwardNorm(nn.BatchNorm2d):
    """A BatchNorm with a forward of its own that always updates its buffers in training mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True,
                                        0.1, self.eps)


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, OwnForwardNorm])
def test_train_mode_normalizes_by_the_batch_and_leaves_batchnorm_buffers_exactly(norm):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), norm(4), nn.ReLU(), nn.Conv2d(4, 2, 3), norm(2)).eval()
    x = torch.rand(5, 3, 8, 8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    reference = nn.Sequential(*[type(m)(m.num_features) if isinstance(m, nn.BatchNorm2d) else m for m in net])
    reference.load_state_dict(before)
    with model_mode(net, "train"):
        assert net.training
        out = net(x)
        net(x * 0.5)  # a second forward, as PGD's steps
    assert torch.equal(out, reference.train()(x))  # batch statistics, bit for bit as a plain training forward
    assert not net.training
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(m.track_running_stats for m in net if isinstance(m, nn.BatchNorm2d))
    # ... while a plain training forward does move them (so the check above can fail).
    assert not torch.equal(reference.state_dict()["1.running_mean"], before["1.running_mean"])


def test_train_mode_restores_batchnorm_tracking_when_the_block_raises():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(RuntimeError, match="inside"), model_mode(net, "train"):
        raise RuntimeError("inside")
    assert net[1].track_running_stats and net.training


def test_a_module_step_waits_for_the_device_only_in_the_policys_agreements_and_the_progress_bar(capsys):
    record = host_work.main(["--tables", "recipes"])  # PGD-10, as gpu_speed.py
    rows = {r["recipe"]: r for r in record["rows"]}
    assert set(rows) == {"robust", "robust, plain loop", "ds p_up 0.5", "ds p_up 0.5, plain loop",
                         "selective margin", "selective_ds margin"}
    for label, row in rows.items():
        if "plain loop" in label:
            assert row["host_waits"] == 0, row["sites"]
            continue
        # The input check before the attack and the finite-loss check after it: one read of the host each; and
        # Lightning's, which turns every step value shown in the progress bar (train/loss) into a number.
        assert row["host_waits"] == 3, row["sites"]
        ours = {site: n for site, n in row["sites"].items() if "lightning_advsel" in site}
        assert list(ours.values()) == [2] and all("(agree)" in site and site.startswith("tolist") for site in ours)
        assert [site for site in row["sites"] if site not in ours] == [
            next(site for site in row["sites"] if "logger_connector/result.py" in site)], row["sites"]
    # No more operators than the hand-written step: the module's own (metrics, logging, checks) are fewer than
    # the plain loop's BatchNorm buffer updates in every attack forward, which model_mode leaves out.
    for label in ("robust", "ds p_up 0.5"):
        assert rows[label]["operators"] <= rows[f"{label}, plain loop"]["operators"], label
    assert "| robust | " in capsys.readouterr().out


def test_the_modules_other_settings_wait_only_where_the_data_decide_a_size(capsys):
    # The paired objectives, the selective authors' clean rows and the callbacks that read every step's selection
    # add no wait of their own, but where a selection's rows decide the size of a forward: the adversarial
    # forward of the attacked rows among the selected pairs (selective recipe, p_up < 1), counted once. The waits
    # do not depend on the attack's steps: one is enough here.
    record = host_work.main(["--tables", "settings", "--pgd-steps", "1"])
    assert record["rows"] == []
    settings = {r["recipe"]: r for r in record["settings"]}
    # A validation batch waits once: its input and label agreement before the attack, which skips pgd's checks.
    validation = settings.pop("validation batch, PGD-1")
    assert validation["host_waits"] == 1 and all("(agree)" in site for site in validation["sites"])
    assert set(settings) == {label for label, *_ in host_work.SETTINGS}
    for label, row in settings.items():
        extra = {site: n for site, n in row["sites"].items() if "lightning_advsel" in site and "(agree)" not in site}
        if label == "selective margin p_up 0.75, TRADES":
            assert list(extra.values()) == [1] and "(__post_init__)" in next(iter(extra)), row["sites"]
        else:
            assert not extra, (label, row["sites"])
        assert row["host_waits"] == 3 + sum(extra.values()), (label, row["sites"])
    out = capsys.readouterr().out
    assert "| robust, TRADES | " in out and "| robust |" not in out


def test_the_compiled_attack_takes_the_attacks_operators_off_the_host_and_waits_for_nothing(capsys):
    """The package's step with the eager and the compiled attack (aot_eager: the graph, without code generation),
    counted alike after the steps that compiled: the compiled step dispatches the step's other operators only, calls
    its graph once per PGD step, and neither waits for the device nor falls back to the eager attack."""
    labels = ["robust"]  # the other recipes' attacks are the same graph at their sizes (tests/test_compiled_attack.py)
    record = host_work.main(["--tables", "compiled", "--attack-backend", "aot_eager", "--pgd-steps", "2",
                             "--step-recipes", *labels])
    assert record["rows"] == record["settings"] == []
    steps = {r["recipe"]: r for r in record["steps"]}
    assert list(steps) == [f"{label}, step, {kind} attack" for label in labels for kind in ("eager", "compiled")]
    for label in labels:
        eager, compiled = steps[f"{label}, step, eager attack"], steps[f"{label}, step, compiled attack"]
        assert eager["host_waits"] == compiled["host_waits"] == 0, (eager["sites"], compiled["sites"])
        assert eager["graph_calls"] == 0 and compiled["graph_calls"] == 2 and compiled["eager_calls"] == 0
        # Two PGD steps of ResNet-18's forward and input backward: hundreds of operators the host no longer dispatches.
        assert compiled["operators"] < eager["operators"] - 300, label
    assert "| robust, step, compiled attack | " in capsys.readouterr().out


def test_host_waits_catch_reads_boolean_masks_and_copies_from_the_host():
    x = torch.arange(4.0)
    waits = host_work.HostWaits()
    with waits:
        x.sum().item()
        bool(x.any())
        x[x > 1]
        torch.tensor([1.0], device="cpu")
        torch.bincount(x.long())  # sized by the largest value
        x[torch.tensor([0, 2])]  # an index tensor: no wait
        torch.full((), 2.0, device="cpu")  # a fill kernel: no wait
        x.tolist()
    names = sorted(site.split(" at ")[0] for site in waits.sites.elements())
    assert names == ["__bool__", "__getitem__", "bincount", "item", "tensor", "tolist"]


@pytest.mark.parametrize("kind", ["replace", "append", "pairs"])
def test_a_pools_subsets_know_their_adversarial_rows_without_reading_the_device_where_the_sizes_decide_them(kind):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 1, 4, 4, generator=g), torch.randint(0, 10, (6,), generator=g)
    pool = build_pool(x, y, torch.tensor([1, 2, 5]), torch.rand(3, 1, 4, 4, generator=g), kind)
    all_adv = build_pool(x, y, torch.arange(6), torch.rand(6, 1, 4, 4, generator=g), kind)
    cases = [(pool, torch.arange(pool.x.shape[0])), (pool, torch.tensor([0, 1, 3])), (pool, torch.tensor([2, 4, 5])),
             (pool, torch.tensor([0, 3])), (all_adv, torch.tensor([1, 4]))]
    for source, rows in cases:
        waits = host_work.HostWaits()
        with waits:
            part = source.subset(rows)
            adv, clean = part.adversarial_rows(), part.clean_rows()
        assert torch.equal(adv, part.is_adv.nonzero().flatten())
        assert torch.equal(clean, (~part.is_adv).nonzero().flatten())
        assert part.n_adv == int(source.is_adv[rows].sum()) and torch.equal(part.x, source.x[rows])
        # The whole pool, or a pool of one kind, has a count the host knows; any other subset reads it once.
        known = rows.numel() == source.x.shape[0] or source.n_adv in (0, source.x.shape[0])
        assert sum(waits.sites.values()) == (0 if known else 1), waits.sites


def test_mask_indices_are_nonzeros_indices_for_any_mask():
    g = torch.Generator().manual_seed(0)
    for n in (0, 1, 7, 300):
        for p in (0.0, 0.3, 1.0):
            mask = torch.rand(n, generator=g) < p
            assert torch.equal(mask_indices(mask, int(mask.sum())), mask.nonzero().flatten()), (n, p)


def test_the_selection_makeup_counts_without_waiting_for_the_device():
    g = torch.Generator().manual_seed(0)
    counts = SelectionCounts(num_classes=4)
    y, is_adv = torch.randint(0, 4, (12,), generator=g), torch.rand(12, generator=g) < 0.5
    selected = torch.tensor([0, 2, 3, 5, 8, 9, 11])
    waits = host_work.HostWaits()
    with waits:
        counts.update(y, is_adv, selected)
    assert not waits.sites
    out, adv, labels = counts.compute(), is_adv[selected], y[selected]
    assert out["class_adv"].tolist() == [int((adv & (labels == c)).sum()) for c in range(4)]
    assert out["class_clean"].tolist() == [int((~adv & (labels == c)).sum()) for c in range(4)]
    assert int(out["n_adv"]) == int(adv.sum()) and int(out["n_clean"]) == int((~adv).sum())
