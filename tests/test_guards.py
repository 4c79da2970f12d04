"""BatchGuards without a Trainer: one process (a strategy of world size 1), a recording ``log``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import TinyNet, tiny_batch

from lightning_advsel import AttackConfig
from lightning_advsel.guards import BatchGuards, agree

ONE_PROCESS = SimpleNamespace(world_size=1)
ATTACK = AttackConfig(eps=0.1, alpha=0.05, steps=1)


def check(guards: BatchGuards, x: torch.Tensor, y: torch.Tensor, stage: str = "train", attack=None, log=None):  # noqa: ANN001, ANN201
    return guards.check_batch(ONE_PROCESS, TinyNet(), x, y, 3, stage, attack, global_step=7, log=log)


def test_labels_of_any_integer_dtype_come_back_as_int64_and_floats_are_refused():
    x, y = tiny_batch(4)
    assert check(BatchGuards(10), x, y.int()).dtype == torch.long
    with pytest.raises(ValueError, match=r"batch 3 has labels of type torch.float32; labels must be integer"):
        check(BatchGuards(10), x, y.float())


def test_labels_outside_the_classes_are_refused_naming_their_range():
    x, y = tiny_batch(4)
    with pytest.raises(ValueError, match=r"labels in \[0, 12\], outside \[0, 9\] for `num_classes`=10"):
        check(BatchGuards(10), x, torch.tensor([0, 1, 2, 12]))
    assert torch.equal(check(BatchGuards(10), x, y), y)


def test_non_finite_training_inputs_raise_or_skip_the_step_and_count_it():
    x, y = tiny_batch(4)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"batch 3 \(global step 7\) holds NaN or inf inputs.*nonfinite: skip"):
        check(BatchGuards(10, "raise"), x, y)
    logged = []
    guards = BatchGuards(10, "skip")
    assert check(guards, x, torch.tensor([0, 1, 2, 12]), log=lambda *a, **k: logged.append(a)) is None
    assert guards.skipped_steps == 1 and logged == [("train/skipped_steps", 1.0)]  # skipped before the labels


def test_a_non_finite_loss_raises_with_its_value_or_is_skipped():
    with pytest.raises(FloatingPointError, match=r"training loss is nan at global step 2 \(batch 5\)"):
        BatchGuards(10).skips(True, True, "loss", 5, 2, loss=torch.tensor(float("nan")))
    assert not BatchGuards(10).skips(False, False, "loss", 5, 2)
    assert BatchGuards(10, "skip").skips(False, True, "loss", 5, 2)


def test_evaluation_refuses_non_finite_inputs_only_for_an_attack():
    x, y = tiny_batch(4)
    x[1] = float("inf")
    assert torch.equal(check(BatchGuards(10), x, y, stage="val"), y)
    with pytest.raises(ValueError, match=r"val batch 3 holds NaN or inf inputs; the val attack needs finite pixels"):
        check(BatchGuards(10), x, y, stage="val", attack=ATTACK)


def test_the_attack_checks_the_pixels_of_each_stages_first_batch_only():
    x, y = tiny_batch(4)
    guards = BatchGuards(10)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check(guards, x + 2, y, stage="test", attack=ATTACK)
    check(guards, x, y, stage="test", attack=ATTACK)
    check(guards, x + 2, y, stage="test", attack=ATTACK)  # checked once: the attack then runs unchecked
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check(guards, x + 2, y, stage="predict", attack=ATTACK)


def test_a_model_output_of_the_wrong_shape_is_refused_once():
    x, _ = tiny_batch(2)
    with pytest.raises(ValueError, match=r"logits of shape \(batch, num_classes\) = \(1, 3\).*got \(1, 10\)"):
        BatchGuards(3).check_model_output(TinyNet(), x)


def test_agree_returns_this_ranks_flags_any_ranks_and_the_summed_counts():
    mine, anyone, counts = agree(ONE_PROCESS, torch.tensor([True, False]), [4, 5])
    assert (mine, anyone, counts) == ([True, False], [True, False], [4, 5])
