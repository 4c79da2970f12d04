"""What TensorBoard shows to compare runs: a hyperparameter session and a custom-scalars layout per run.

Written once when fitting starts (:func:`describe_run`, called from the module's ``on_fit_start``) into every
TensorBoard logger of the trainer:

* **HPARAMS**: the recipe and its settings (:func:`run_hparams`) against :data:`HPARAM_METRICS`, so that the
  runs of one log folder form one sortable table of recipe, accuracy and compute. TensorBoard keeps the first
  hyperparameter session of a run; Lightning's own session (all constructor arguments against a placeholder
  ``hp_metric``) is written after this one, and not at all with ``default_hp_metric=False``, which the shipped
  logger sets.
* **CUSTOM SCALARS**: :data:`LAYOUT`, the charts a user compares recipes by.
"""

from __future__ import annotations

import re

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from lightning_advsel.cost import COUNTERS
from lightning_advsel.step import RECIPES, StepSettings

STEP_TAGS = [f"cost/{name}" for name in COUNTERS]  # per training step, summed over ranks
TOTAL_TAGS = [f"cost/{name}_total" for name in COUNTERS]  # since the run started, at each epoch end
EPOCH_SECONDS = "cost/epoch_seconds"
# The HPARAMS table's columns besides the hyperparameters. test/acc_robust fills in when a test logs into
# the same run (TensorBoard shows the last value of each tag).
HPARAM_METRICS = ["val/acc_clean", "val/acc_robust", "test/acc_robust", *TOTAL_TAGS]


def _chart(*tags: str) -> list:
    # Custom-scalar charts match tags as regular expressions: anchor them, so `train/acc` is not `train/acc_*`.
    return ["Multiline", [f"^{re.escape(tag)}$" for tag in tags]]


LAYOUT = {
    "accuracy": {
        "clean and robust, train and val": _chart("train/acc", "train/acc_selected", "val/acc_clean",
                                                  "val/acc_robust"),
    },
    "selection": {
        "P_up, clean and adversarial share of the selected rows, attacked share": _chart(
            "train/p_up", "train/selected_clean_frac", "train/selected_adv_frac", "train/attacked_frac"),
    },
    "cost": {
        "per training step": _chart(*STEP_TAGS),
        "totals since the run started": _chart(*TOTAL_TAGS),
        "seconds per epoch": _chart(EPOCH_SECONDS),
    },
    "minimum perturbation": {
        "mean and median radius, robust share at the training eps": _chart(
            "minperturb/mean", "minperturb/median", "minperturb/robust_frac_at_train_eps"),
    },
    "training attack": {
        "radius during the eps warm-up (pixels)": _chart("train/eps"),
    },
}


def run_hparams(settings: StepSettings, eps_warmup_epochs: float = 0.0) -> dict[str, str | float | int]:
    """The hyperparameters of a run's row in the HPARAMS table.

    ``attack_frac`` and ``attack_score`` only for the recipes that choose rows before the attack (elsewhere
    they do nothing and would read as if they did); the objective, and its weight for TRADES and MART; the
    radius warm-up's epochs when there is one; the training attack's loss when it is the margin.
    """
    attack = settings.train_attack
    params: dict[str, str | float | int] = {"recipe": settings.recipe, "p_up": settings.p_up}
    if RECIPES[settings.recipe].attack == "score":
        params.update(attack_frac=settings.attack_frac, attack_score=settings.attack_score)
    params.update(eps=attack.eps, steps=attack.steps, objective=settings.objective.name)
    if settings.objective.paired:  # beta of TRADES, lambda of MART
        params["objective_weight"] = settings.objective.weight
    if attack.loss != "ce":  # the training attack's loss, when it is not the cross-entropy
        params["attack_loss"] = attack.loss
    if eps_warmup_epochs:
        params["eps_warmup_epochs"] = eps_warmup_epochs
    return params


@rank_zero_only
def describe_run(loggers: list, settings: StepSettings, eps_warmup_epochs: float = 0.0) -> None:
    """Write the hyperparameter session and the custom-scalars layout into each TensorBoard logger."""
    from torch.utils.tensorboard.summary import hparams

    for logger in loggers:
        if not isinstance(logger, TensorBoardLogger):
            continue
        writer = logger.experiment
        writer.add_custom_scalars(LAYOUT)
        # Only the metric names are written here; TensorBoard reads their values from the run's scalars.
        experiment, start, end = hparams(run_hparams(settings, eps_warmup_epochs), dict.fromkeys(HPARAM_METRICS, 0.0))
        file_writer = writer._get_file_writer()  # as Lightning's TensorBoardLogger.log_hyperparams does
        for summary in (experiment, start, end):
            file_writer.add_summary(summary)
