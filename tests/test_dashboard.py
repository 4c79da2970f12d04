"""What TensorBoard shows to compare runs: the cost counters, the HPARAMS session and the custom-scalars layout.

Read back from the event files of short runs, as TensorBoard reads them.
"""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
from conftest import TinyNet, config_args, tiny_batch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_advsel import AdversarialSelectionModule, AttackConfig, cost, dashboard
from lightning_advsel.cli import build_cli
from lightning_advsel.step import StepCost, StepSettings

BATCH, BATCHES, EPOCHS, STEPS = 64, 3, 2, 2  # the digits base's batch; the short run's batches, epochs, PGD steps
# Work per batch of each recipe's config, from the configuration (B = 64 clean rows, PGD-2):
# (attacked rows x steps, rows forwarded, rows backpropagated).
PER_BATCH = {
    # every row attacked; the adversarial batch forwarded and backpropagated once
    "robust": (BATCH * STEPS, BATCH, BATCH),
    # every row attacked; the 2B pool scored without grad, the top p_up = 0.5 of it (B rows) trained on
    "ds": (BATCH * STEPS, 2 * BATCH + BATCH, BATCH),
    # the clean batch scored (margin), attack_frac = 0.5 of it attacked, the mixed batch trained on
    "selective_margin": (BATCH // 2 * STEPS, BATCH + BATCH, BATCH),
}


def events(log_dir: Path):  # noqa: ANN201 - an EventAccumulator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def hparams_session(acc) -> tuple[dict, list[str]]:  # noqa: ANN001
    """The first hyperparameter session of a run (the one TensorBoard shows): its values and metric names."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    values = {key: value.string_value or value.number_value for key, value in start.session_start_info.hparams.items()}
    return values, [info.name.tag for info in experiment.experiment.metric_infos]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(PER_BATCH))
def test_a_short_run_writes_the_layout_the_hparams_session_and_the_cost_of_its_config(tmp_path, capsys, recipe):
    from tensorboard.plugins.custom_scalar import layout_pb2

    cli = build_cli(["fit", *config_args("digits/base.yaml", f"recipes/{recipe}.yaml"),
                     "--trainer.max_epochs", str(EPOCHS), "--trainer.limit_train_batches", str(BATCHES),
                     "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
                     "--trainer.enable_progress_bar", "false",
                     "--model.init_args.train_attack.steps", str(STEPS), "--model.init_args.eval_attack.steps", "1",
                     "--trainer.logger.init_args.save_dir", str(tmp_path)])
    acc = events(Path(cli.trainer.log_dir))
    scalars = {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    # Cost: every step's counts and the totals at each epoch end equal what the configuration implies.
    for tag, per_batch in zip(dashboard.STEP_TAGS, PER_BATCH[recipe], strict=True):
        assert scalars[tag] == [per_batch] * (EPOCHS * BATCHES), tag
    for tag, per_batch in zip(dashboard.TOTAL_TAGS, PER_BATCH[recipe], strict=True):
        assert scalars[tag] == [per_batch * BATCHES * (epoch + 1) for epoch in range(EPOCHS)], tag
    assert len(scalars[dashboard.EPOCH_SECONDS]) == EPOCHS and all(s > 0 for s in scalars[dashboard.EPOCH_SECONDS])
    robust_attack = BATCH * STEPS * BATCHES * EPOCHS
    share = round(100 * PER_BATCH[recipe][0] * BATCHES * EPOCHS / robust_attack)
    assert (f"training cost: attack steps {PER_BATCH[recipe][0] * BATCHES * EPOCHS} ({share}% of robust training's)"
            in capsys.readouterr().out)

    # HPARAMS: this run's settings against accuracy and cost, and no placeholder hp_metric.
    values, metrics = hparams_session(acc)
    settings = cli.model.settings
    assert values["recipe"] == settings.recipe and values["p_up"] == settings.p_up
    assert values["eps"] == pytest.approx(0.1) and values["steps"] == STEPS
    assert ("attack_score" in values) == (recipe == "selective_margin")
    assert metrics == dashboard.HPARAM_METRICS
    assert "hp_metric" not in scalars
    assert all(tag in scalars for tag in metrics if not tag.startswith("test/"))

    # CUSTOM SCALARS: one layout, with the four categories, whose every chart finds its tags in the run
    # (the minimum-perturbation chart's come with the dashboards overlay).
    (layout_event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(layout_event.tensor_proto.string_val[0])
    assert [c.title for c in layout.category] == ["accuracy", "selection", "cost", "minimum perturbation",
                                                  "training attack"]
    for category in layout.category[:3]:
        for chart in category.chart:
            for pattern in chart.multiline.tag:
                assert any(re.match(pattern, tag) for tag in scalars), (chart.title, pattern)


def test_the_run_session_comes_before_lightnings_placeholder_with_a_default_logger(tmp_path):
    x, y = tiny_batch(16)
    module = AdversarialSelectionModule(TinyNet(), recipe="selective", attack_frac=0.25)
    logger = TensorBoardLogger(tmp_path, name="plain")  # default_hp_metric=True: Lightning writes a session too
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=1, limit_val_batches=0, logger=logger,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16))
    values, metrics = hparams_session(events(Path(logger.log_dir)))
    assert values == {"recipe": "selective", "p_up": 1.0, "attack_frac": 0.25, "attack_score": "margin",
                      "eps": pytest.approx(0.1), "steps": 10, "objective": "ce"}
    assert "hp_metric" not in metrics


def test_robust_cost_attacks_every_row_and_trains_the_batch_once():
    settings = StepSettings(recipe="selective", p_up=1.0)  # the attack's steps and restarts are what count
    assert cost.robust_cost(settings, 64) == StepCost(attack_grad_steps=64 * 10, forward_rows=64, backward_rows=64)


def test_the_summary_gives_each_total_and_its_share_of_robust_training():
    totals = {"attack_grad_steps": 1_234_567, "robust_attack_grad_steps": 2_000_000, "forward_rows": 900,
              "robust_forward_rows": 300, "backward_rows": 150, "robust_backward_rows": 300}
    assert cost.summary(totals) == ("attack steps 1.2e6 (62% of robust training's), forward rows 900 (300%), "
                                    "backward rows 150 (50%)")


def test_the_table_names_the_objective_and_the_weight_of_a_paired_one():
    from lightning_advsel.dashboard import run_hparams
    from lightning_advsel.objectives import Objective

    assert run_hparams(StepSettings(recipe="ds"))["objective"] == "ce"
    assert "objective_weight" not in run_hparams(StepSettings(recipe="ds"))
    trades = run_hparams(StepSettings(recipe="ds", objective=Objective("trades")))
    assert trades["objective"] == "trades" and trades["objective_weight"] == 6.0


def test_the_table_shows_the_eps_warmup_only_for_a_run_that_has_one():
    from lightning_advsel.dashboard import run_hparams

    assert "eps_warmup_epochs" not in run_hparams(StepSettings(recipe="robust"))
    assert run_hparams(StepSettings(recipe="robust"), eps_warmup_epochs=2.0)["eps_warmup_epochs"] == 2.0


def test_the_table_shows_the_training_attack_loss_only_when_it_is_the_margin():
    from lightning_advsel.dashboard import run_hparams

    assert "attack_loss" not in run_hparams(StepSettings(recipe="robust"))
    margin = StepSettings(recipe="robust", train_attack=AttackConfig(loss="margin"))
    assert run_hparams(margin)["attack_loss"] == "margin"
