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
from lightning_advsel.metrics import SyncFreeMean

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
    record = host_work.main([])  # PGD-10, as gpu_speed.py
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
        assert list(ours.values()) == [2] and all("(_agree)" in site and site.startswith("tolist") for site in ours)
        assert [site for site in row["sites"] if site not in ours] == [
            next(site for site in row["sites"] if "logger_connector/result.py" in site)], row["sites"]
    # No more operators than the hand-written step: the module's own (metrics, logging, checks) are fewer than
    # the plain loop's BatchNorm buffer updates in every attack forward, which model_mode leaves out.
    for label in ("robust", "ds p_up 0.5"):
        assert rows[label]["operators"] <= rows[f"{label}, plain loop"]["operators"], label
    assert "| robust | " in capsys.readouterr().out


def test_host_waits_catch_reads_boolean_masks_and_copies_from_the_host():
    x = torch.arange(4.0)
    waits = host_work.HostWaits()
    with waits:
        x.sum().item()
        bool(x.any())
        x[x > 1]
        torch.tensor([1.0], device="cpu")
        x[torch.tensor([0, 2])]  # an index tensor: no wait
        torch.full((), 2.0, device="cpu")  # a fill kernel: no wait
        x.tolist()
    names = sorted(site.split(" at ")[0] for site in waits.sites.elements())
    assert names == ["__bool__", "__getitem__", "item", "tensor", "tolist"]
