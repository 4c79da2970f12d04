"""The sizes of a training step's stages, known before the data: what a compiled step can specialise on.

A compiled graph is specialised on its input shapes (``torch.compile(dynamic=False)``); a new size is a new
compilation. Each recipe fixes its sizes from the batch size ``B`` alone:

* ``robust`` (and ``ds``, ``random``) attacks ``B`` rows; ``selective`` and ``selective_ds`` attack
  ``k = round(attack_frac * B)`` rows (:func:`~lightning_advsel.selection.fraction_count`), by ``topk`` of a score;
* the pool is ``B`` rows (``"replace"`` pools, and the pairs of TRADES and MART), ``2B`` for ``ds`` and ``random``,
  ``B + k`` for ``selective_ds``;
* the post-attack selection keeps ``round(p_up * pool)`` rows by ``topk``.

Over an epoch the sizes change only at known points: a smaller last batch (its own graph, or dropped with the
data loader's ``drop_last=True``), the epochs of ``attack_warmup_epochs`` (every row attacked, with
``attack_warmup="all"``), and an epoch whose ``p_up`` a callback such as
:class:`~lightning_advsel.callbacks.AdaptivePUp` changed (a new selected count). :func:`attack_sizes` lists the
attack's sizes of a run, so that a compiled attack can bound its graphs by them.

Where the data decide a size, the stage stays eager (:func:`data_sized`): under global selection each rank's
selected count follows every rank's scores; with a paired objective at ``p_up < 1`` in a recipe that attacks part
of the batch, the selected pairs decide how many adversarial examples the training forward takes; SyncBatchNorm
reduces over the ranks inside every forward.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from lightning_advsel.selection import fraction_count
from lightning_advsel.step import RECIPES, StepSettings


@dataclass(frozen=True)
class StepShapes:
    """The rows of one step's stages.

    Attributes:
        attacked: rows the training attack runs on.
        pool: rows the post-attack selection chooses from.
        selected: rows of the training forward and backward; ``None`` where the data decide it (global selection).
    """

    attacked: int
    pool: int
    selected: int | None


def attacked_rows(settings: StepSettings, batch_size: int) -> int:
    """Rows of a batch of ``batch_size`` that the recipe attacks: none, all, or ``round(attack_frac * B)``."""
    if not settings.attacks:
        return 0
    return batch_size if RECIPES[settings.recipe].attack == "all" else fraction_count(batch_size, settings.attack_frac)


def step_shapes(settings: StepSettings, batch_size: int, selection_scope: str = "local") -> StepShapes:
    """The sizes of a step of ``settings`` on a batch of ``batch_size`` rows (see the module docstring).

    Raises:
        ValueError: for a ``batch_size`` below 1.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    attacked = attacked_rows(settings, batch_size)
    appends = RECIPES[settings.recipe].pool == "append" or settings.clean_rows == "all"
    pool = batch_size + attacked if appends and not settings.objective.paired else batch_size
    selected = None if selection_scope == "global" else fraction_count(pool, settings.p_up)
    return StepShapes(attacked=attacked, pool=pool, selected=selected)


def last_batch_rows(dataset_rows: int, batch_size: int, drop_last: bool = False) -> int | None:
    """Rows of an epoch's last batch when it is smaller than the others, else ``None`` (none, or dropped)."""
    rest = dataset_rows % batch_size
    return None if rest == 0 or drop_last else rest


def attack_sizes(settings: StepSettings, batch_sizes: Iterable[int], attack_warmup_epochs: int = 0,
                 attack_warmup: str = "all") -> list[int]:
    """The distinct attacked row counts of a run whose batches have ``batch_sizes`` rows (the full size and a
    smaller last one), largest first: each is one graph of a compiled attack. The epochs of
    ``attack_warmup_epochs`` attack every row with ``attack_warmup="all"`` (a random ``attack_frac`` with
    ``"random"``: the same count)."""
    sizes = {attacked_rows(settings, b) for b in batch_sizes}
    if attack_warmup_epochs and attack_warmup == "all" and RECIPES[settings.recipe].attack == "score":
        sizes |= set(batch_sizes)
    return sorted((s for s in sizes if s), reverse=True)


def data_sized(settings: StepSettings, selection_scope: str = "local", model: nn.Module | None = None) -> str | None:
    """Why a stage's sizes follow the data in this setting (so it stays eager), ``None`` if none does."""
    if model is not None and any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        return "SyncBatchNorm reduces its batch statistics over the ranks inside every forward"
    if selection_scope == "global":
        return "selection_scope 'global': each rank's selected count follows the scores of every rank"
    if settings.objective.paired and settings.p_up < 1 and RECIPES[settings.recipe].attack == "score":
        return (f"objective {settings.objective.name!r} at p_up {settings.p_up:g} with a recipe that attacks part "
                f"of the batch: the selected pairs decide how many adversarial examples the training forward takes")
    return None


def compile_plan(settings: StepSettings, batch_size: int, last_batch: int | None = None, *,
                 attack_warmup_epochs: int = 0, attack_warmup: str = "all", selection_scope: str = "local",
                 model: nn.Module | None = None, eager_attack_reason: str | None = None) -> str:
    """The one line a fit with a compiled attack prints: what is compiled, at which sizes, and what stays eager.

    Args:
        settings: the step's settings.
        batch_size: rows of a full batch.
        last_batch: rows of a smaller last batch (:func:`last_batch_rows`), ``None`` if there is none.
        attack_warmup_epochs: the module's argument of that name.
        attack_warmup: the module's argument of that name.
        selection_scope: ``"local"`` or ``"global"``.
        model: the network (for SyncBatchNorm).
        eager_attack_reason: why the attack itself stays eager
            (:func:`~lightning_advsel.compiled_attack.eager_reason`), if it does.
    """
    attack = settings.train_attack
    if not settings.attacks:
        return f"compile_attack: recipe {settings.recipe!r} attacks no row; nothing to compile"
    if eager_attack_reason is not None:
        return f"compile_attack: the training attack stays eager: {eager_attack_reason}"
    batches = [batch_size] if last_batch is None else [batch_size, last_batch]
    sizes = attack_sizes(settings, batches, attack_warmup_epochs, attack_warmup)
    rows = attacked_rows(settings, batch_size)
    line = (f"compile_attack: {settings.recipe} attacks {rows} of {batch_size} rows a batch ({attack.describe()}, "
            f"{attack.mode} mode) in one compiled graph; {len(sizes)} attack graph(s) in all, for "
            f"{', '.join(map(str, sizes))} rows")
    if last_batch is not None:
        line += f" (the last batch of {last_batch} rows has its own; drop_last=True in the data loader drops it)"
    sized = data_sized(settings, selection_scope, model)
    return f"{line}; the scoring, selection and training forward stay eager{f' ({sized})' if sized else ''}"
