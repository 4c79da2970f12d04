"""The metric groups without a Trainer: a real training step's result, and a ``log`` that records its calls."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyNet, tiny_batch

from lightning_advsel import AttackConfig
from lightning_advsel.metric_groups import EvalMetrics, MetricGroups, TrainMetrics
from lightning_advsel.step import StepSettings, adversarial_step

SETTINGS = StepSettings(recipe="selective", p_up=1.0, attack_frac=0.5,
                        train_attack=AttackConfig(eps=0.1, alpha=0.05, steps=1, mode="train"))


class Log:
    def __init__(self) -> None:
        self.calls: dict[str, dict] = {}

    def __call__(self, key: str, value: object, **kwargs: object) -> None:
        self.calls[key] = {"value": value, **kwargs}


def step_result():  # noqa: ANN201
    torch.manual_seed(0)
    x, y = tiny_batch(8)
    return adversarial_step(TinyNet(), x, y, SETTINGS, torch.Generator().manual_seed(0))


def test_a_training_step_logs_every_key_with_the_metric_lightning_can_find():
    group, log, out = TrainMetrics(10, "metric_groups.train_0"), Log(), step_result()
    group.log_step(out, log, torch.tensor(0.5))
    assert list(log.calls) == ["train/loss", "train/p_up", "train/acc", "train/acc_selected",
                               "train/selected_adv_frac", "train/selected_clean_frac", "train/attacked_frac",
                               "train/attack_score_selected", "train/attack_score_unselected"]
    assert log.calls["train/acc"]["metric_attribute"] == "metric_groups.train_0.acc"
    assert log.calls["train/loss"]["on_step"] and not log.calls["train/acc"]["on_step"]
    assert float(group.attacked_frac.compute()) == pytest.approx(0.5)
    torch.testing.assert_close(group.loss.compute(), out.loss.detach())


def test_the_checkpointed_states_round_trip_and_unknown_entries_are_skipped():
    group = TrainMetrics(10, "g")
    group.log_step(step_result(), Log(), torch.tensor(1.0))
    state = group.state()
    assert set(state) == {"train_acc", "train_acc_selected", "train_adv_frac", "train_clean_frac",
                          "train_attacked_frac"}
    other = TrainMetrics(10, "g")
    other.load_state({**state, "train_unknown": {"x": torch.zeros(1)}, "val_acc": {}})
    for name in TrainMetrics.RESUMED:
        torch.testing.assert_close(getattr(other, name).compute(), getattr(group, name).compute())


def test_each_stage_and_loader_has_its_own_group_made_when_first_met():
    groups = MetricGroups(10, "metric_groups")
    val0, val1 = groups.eval_group("val", 0, torch.device("cpu")), groups.eval_group("val", 1, torch.device("cpu"))
    assert val0 is not val1 and groups.eval_group("val", 0, torch.device("cpu")) is val0
    assert list(groups) == ["train_0", "val_0", "val_1"] and val1.attribute == "metric_groups.val_1"


def test_an_evaluation_group_keeps_a_diverged_loss_as_nan():
    group, log = EvalMetrics(3, "g"), Log()
    logits, y = torch.tensor([[9.0, 0.0, 0.0], [float("nan"), 0.0, 0.0]]), torch.tensor([0, 1])
    group.log_clean(log, "val", logits, y)
    group.log_robust(log, "val", torch.tensor([[0.0, 9.0, 0.0], [0.0, 9.0, 0.0]]), y)
    assert list(log.calls) == ["val/loss_clean", "val/acc_clean", "val/acc_robust"]
    assert torch.isnan(group.loss_clean.compute()) and float(group.acc_robust.compute()) == 0.5
