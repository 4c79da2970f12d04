"""The sizes of each recipe's stages, known from the batch size (lightning_advsel.static_shapes)."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyNet, tiny_batch
from torch import nn

from lightning_advsel.attacks import AttackConfig
from lightning_advsel.objectives import Objective
from lightning_advsel.static_shapes import (
    StepShapes,
    attack_sizes,
    compile_plan,
    data_sized,
    last_batch_rows,
    step_shapes,
)
from lightning_advsel.step import StepSettings, adversarial_step

ATTACK = AttackConfig(eps=0.1, alpha=0.05, steps=1, random_start=False, mode="train")


def settings(recipe: str, p_up: float | None = None, **kwargs) -> StepSettings:
    p_up = p_up if p_up is not None else (0.5 if recipe in ("ds", "random", "selective_ds") else 1.0)
    return StepSettings(recipe=recipe, p_up=p_up, attack_frac=0.5, **{"train_attack": ATTACK, **kwargs})


@pytest.mark.parametrize("recipe,expected", [
    ("standard", StepShapes(attacked=0, pool=256, selected=256)),
    ("robust", StepShapes(attacked=256, pool=256, selected=256)),
    ("ds", StepShapes(attacked=256, pool=512, selected=256)),
    ("random", StepShapes(attacked=256, pool=512, selected=256)),
    ("selective", StepShapes(attacked=128, pool=256, selected=256)),
    ("selective_ds", StepShapes(attacked=128, pool=384, selected=192)),
])
def test_each_recipe_fixes_its_sizes_from_the_batch_size(recipe, expected):
    assert step_shapes(settings(recipe), 256) == expected


def test_paired_objectives_pool_the_batch_and_global_selection_leaves_the_selected_count_to_the_data():
    assert step_shapes(settings("ds", objective=Objective("trades")), 256) == StepShapes(256, 256, 128)
    assert step_shapes(settings("selective", clean_rows="all"), 256) == StepShapes(128, 384, 384)
    assert step_shapes(settings("ds"), 256, selection_scope="global").selected is None
    assert step_shapes(settings("robust", train_attack=AttackConfig(eps=0.0)), 8).attacked == 0
    with pytest.raises(ValueError, match="`batch_size` must be >= 1, got 0"):
        step_shapes(settings("robust"), 0)


@pytest.mark.parametrize("recipe,objective,p_up", [("ds", "ce", 0.25), ("selective_ds", "ce", 0.5),
                                                   ("selective", "mart", 0.75), ("random", "ce", 0.5)])
def test_the_steps_own_sizes_are_the_static_ones(recipe, objective, p_up):
    x, y = tiny_batch(12)
    step = settings(recipe, p_up, objective=Objective(objective))
    record = adversarial_step(TinyNet(), x, y, step, torch.Generator().manual_seed(0)).record
    shapes = step_shapes(step, 12)
    assert (record.attacked.numel(), record.y.numel(), record.selected.numel()) == (
        shapes.attacked, shapes.pool, shapes.selected)


def test_a_run_attacks_one_size_per_batch_size_and_warm_up_choice():
    selective = settings("selective")
    assert last_batch_rows(1000, 256) == 232 and last_batch_rows(1024, 256) is None
    assert last_batch_rows(1000, 256, drop_last=True) is None
    assert attack_sizes(selective, [256, 232]) == [128, 116]
    assert attack_sizes(selective, [256, 232], attack_warmup_epochs=2) == [256, 232, 128, 116]
    assert attack_sizes(selective, [256], attack_warmup_epochs=2, attack_warmup="random") == [128]
    assert attack_sizes(settings("robust"), [256], attack_warmup_epochs=2) == [256]
    assert attack_sizes(settings("standard"), [256]) == []


def test_the_settings_whose_sizes_the_data_decide_are_named():
    assert data_sized(settings("selective", 0.5, objective=Objective("trades"))).startswith("objective 'trades' at")
    assert data_sized(settings("robust", 0.5, objective=Objective("trades"))) is None  # every pair adversarial
    assert "global" in data_sized(settings("ds"), selection_scope="global")
    sync = nn.Sequential(nn.Linear(4, 4), nn.SyncBatchNorm(4))
    assert "SyncBatchNorm" in data_sized(settings("ds"), model=sync)
    assert data_sized(settings("ds"), model=TinyNet(batchnorm=True)) is None


def test_the_fit_line_names_what_is_compiled_at_which_sizes_and_what_stays_eager():
    line = compile_plan(settings("selective"), 256, 232, attack_warmup_epochs=1)
    assert line.startswith("compile_attack: selective attacks 128 of 256 rows a batch (PGD-1 linf")
    assert "4 attack graph(s) in all, for 256, 232, 128, 116 rows" in line and "drop_last=True" in line
    assert line.endswith("the scoring, selection and training forward stay eager")
    global_line = compile_plan(settings("ds"), 256, selection_scope="global")
    assert "1 attack graph(s)" in global_line and global_line.endswith("every rank)")
    assert compile_plan(settings("standard"), 256) == ("compile_attack: recipe 'standard' attacks no row; nothing "
                                                       "to compile")
    assert compile_plan(settings("robust"), 256, eager_attack_reason="SyncBatchNorm (bn)").endswith(
        "the training attack stays eager: SyncBatchNorm (bn)")
