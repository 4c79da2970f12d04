"""One training step as plain functions: a batch in, the loss over the selected rows and a record out::

    result = adversarial_step(model, x, y, settings, generator)   # settings: a StepSettings
    result.loss.backward()                                          # or Lightning's manual_backward
    result.record                                                   # what was attacked and selected

:func:`adversarial_step` is the whole data path, in five calls a reader can follow on one screen:

1. **Pre-attack selection** (:func:`rows_to_attack`): which clean rows are attacked: none, all, or the top
   ``attack_frac`` by a pre-attack score from one no-grad forward pass (selective recipes).
2. **Attack**: ``settings.train_attack`` (PGD) on those rows only.
3. **Pool** (:func:`build_pool`): ``"replace"`` puts each adversarial example in place of its clean row
   (robust, selective); ``"append"`` keeps the clean rows and adds the adversarial ones (the DS paper's 2b').
4. **Post-attack selection** (:func:`select_pool`): the top ``p_up`` fraction of the pool by per-sample
   cross-entropy (one no-grad scoring pass), or a random ``p_up`` fraction; all of it at ``p_up == 1``.
5. **Loss** (:func:`selected_loss`): one forward over the selected rows only, so the backward work scales
   with ``p_up``; the mean cross-entropy over them.

Nothing here touches a Trainer. Distributed training enters as the ``scope`` argument: :data:`LOCAL` (each
process selects from its own pool) or :class:`GlobalScope` (processes agree on the top ``p_up`` of the global
pool through the Lightning strategy, see :mod:`lightning_advsel.distributed`). The random generator is the
caller's: the module reseeds one per step so that a resumed run draws the same PGD starts and random picks.

Selective recipes (``attack="score"``) with ``p_up=1`` give the mixed objective: cross-entropy on the
adversarial example of each attacked row and on the clean input of every other row, averaged over the batch.
``selective_ds`` applies the data-selection rule to the clean batch plus the attacked rows.

Reuse of the scoring forward: with the ``"append"`` pool the pre-attack pass's clean logits are the clean rows'
post-attack scores, so the clean rows are not forwarded twice. With ``"replace"`` they are not reused as the
clean-loss forward of the unattacked rows: the scoring pass runs under ``no_grad`` (it must not hold
activations for the whole batch while PGD runs) and, with BatchNorm, under the clean batch's statistics,
whereas the training forward normalizes the mixed batch together. That extra no-grad forward is the ``+1`` in
the ``(k + 4) / (2k + 3)`` cost of selective training at ``attack_frac=0.5`` relative to PGD-k training
(``benchmarks/flops_per_step.py``).

BatchNorm: the scoring passes and (by default) the attack run with batch statistics but leave the running
statistics untouched (:func:`~lightning_advsel.attacks.model_mode` ``"train"``); only the training forward
updates them, so running statistics see exactly the rows that are backpropagated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, Protocol, get_args, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from lightning_advsel import checks, distributed, selection
from lightning_advsel.attacks import MODES, AttackConfig, Mode, model_mode
from lightning_advsel.objectives import Objective


@dataclass(frozen=True)
class Recipe:
    """How a named recipe fills the stages of a step."""

    attack: str  # "none" | "all" | "score"
    pool: str  # "replace" | "append"
    post: str  # "loss" | "random"


CleanRows = Literal["unattacked", "all"]
CLEAN_ROWS = get_args(CleanRows)
SelectionForward = Literal["separate", "shared"]
SELECTION_FORWARDS = get_args(SelectionForward)
RecipeName = Literal["standard", "robust", "ds", "random", "selective", "selective_ds"]

# Keyed in the order of `RecipeName`; tests/test_checks.py holds the two together.
RECIPES: dict[str, Recipe] = {
    "standard": Recipe(attack="none", pool="replace", post="loss"),
    "robust": Recipe(attack="all", pool="replace", post="loss"),
    "ds": Recipe(attack="all", pool="append", post="loss"),
    "random": Recipe(attack="all", pool="append", post="random"),
    "selective": Recipe(attack="score", pool="replace", post="loss"),
    "selective_ds": Recipe(attack="score", pool="append", post="loss"),
}


def default_p_up(recipe: str) -> float:
    """The ``p_up`` a recipe uses unless told otherwise.

    An ``"append"`` pool holds the clean batch plus its adversarial rows; the DS paper backpropagates half of
    it (``ds``, ``random``, ``selective_ds``). A ``"replace"`` pool is the batch itself, trained on whole
    (``standard``, ``robust``, ``selective``: with ``p_up < 1`` they would drop rows nobody asked to drop).
    """
    return 0.5 if RECIPES[recipe].pool == "append" else 1.0


@dataclass(frozen=True)
class StepSettings:
    """What a training step does, checked once when built.

    Attributes:
        recipe: a key of :data:`RECIPES`.
        p_up: fraction of the pool backpropagated, in (0, 1].
        attack_frac: fraction of the clean batch attacked by the selective recipes, in (0, 1].
        attack_score: pre-attack score of the selective recipes, a key of
            :data:`~lightning_advsel.selection.PRE_ATTACK_SCORES`.
        train_attack: the attack that makes the training examples.
        scoring_mode: model mode of the no-grad scoring passes (:func:`~lightning_advsel.attacks.model_mode`).
        objective: the training objective (:class:`~lightning_advsel.objectives.Objective`); with a paired one
            (TRADES, MART) the pool is the batch's (clean, adversarial) pairs.
        attack_sampling: how the selective recipes pick the ``attack_frac`` rows from their scores: ``"top"``
            (the best scores) or ``"proportional"`` (drawn with probability proportional to ``1 / |margin|``,
            for the margin scores only).
        clean_weight: weight of the clean rows' loss among the backpropagated rows (the unattacked rows of the
            selective recipes, the clean rows of a DS pool), >= 0; the loss is ``(sum of the adversarial rows'
            losses + clean_weight * sum of the clean rows' losses) / selected rows``. 1 is the plain mean.
        clean_rows: which clean inputs the ``selective`` recipe trains on: ``"unattacked"`` (default: the rows
            that were not attacked, in one mean with the adversarial rows) or ``"all"`` (every clean input of
            the batch, in a separate forward, as the selective paper's authors' script does; the loss is then
            the mean adversarial loss plus ``clean_weight`` times the mean clean loss).
        selection_forward: ``"separate"`` (default): score the pool in a no-grad pass, then forward and
            backward the selected rows only, so the backward work scales with ``p_up``. ``"shared"``: one
            forward with gradients over the whole pool, scores read from it and the loss taken over the selected
            rows (the backward then runs through the whole pool's forward, as the DS paper's small measured
            saving suggests it was run); BatchNorm sees one batch for scoring and training. Cross-entropy only.

    Raises:
        ValueError: for an unknown ``recipe``, ``attack_score`` or ``scoring_mode``, a fraction outside (0, 1],
            a recipe that cannot carry a paired objective (``standard``, ``selective_ds``), a negative
            ``clean_weight``, or ``"proportional"`` sampling with a score that is not a margin.
    """

    recipe: RecipeName = "ds"
    p_up: float = 0.5
    attack_frac: float = 0.5
    attack_score: selection.AttackScore = "margin"
    train_attack: AttackConfig = field(default_factory=lambda: AttackConfig(mode="train"))
    scoring_mode: Mode = "train"
    objective: Objective = field(default_factory=Objective)
    attack_sampling: selection.AttackSampling = "top"
    clean_weight: float = 1.0
    selection_forward: SelectionForward = "separate"
    clean_rows: CleanRows = "unattacked"

    def __post_init__(self) -> None:
        checks.check_choice("recipe", self.recipe, RECIPES)
        checks.check_choice("attack_score", self.attack_score, selection.PRE_ATTACK_SCORES)
        checks.check_choice("scoring_mode", self.scoring_mode, MODES)
        object.__setattr__(self, "p_up", checks.check_fraction("p_up", self.p_up))
        object.__setattr__(self, "attack_frac", checks.check_fraction("attack_frac", self.attack_frac))
        checks.check_choice("attack_sampling", self.attack_sampling, selection.ATTACK_SAMPLINGS)
        if self.attack_sampling == "proportional" and not self.attack_score.startswith("margin"):
            raise ValueError(f"`attack_sampling`='proportional' draws rows with probability 1 / |margin|, so it needs "
                             f"`attack_score` 'margin' or 'margin_true', got {self.attack_score!r}")
        object.__setattr__(self, "clean_weight", checks.check_number("clean_weight", self.clean_weight, 0.0))
        checks.check_choice("selection_forward", self.selection_forward, SELECTION_FORWARDS)
        if self.selection_forward == "shared" and self.objective.paired:
            raise ValueError(f"`selection_forward`='shared' scores rows by their training cross-entropy; objective "
                             f"{self.objective.name!r} scores pairs: use 'separate'")
        checks.check_choice("clean_rows", self.clean_rows, CLEAN_ROWS)
        if self.clean_rows == "all" and (self.recipe != "selective" or self.objective.paired or self.p_up != 1):
            raise ValueError(f"`clean_rows`='all' trains the selective recipe's whole clean batch next to its attacked "
                             f"rows, so it needs `recipe`='selective', the 'ce' objective and `p_up`=1, got "
                             f"recipe {self.recipe!r}, objective {self.objective.name!r}, p_up {self.p_up}")
        if self.objective.name == "trades" and self.train_attack.loss != "ce":
            raise ValueError(f"objective 'trades' attacks its own loss (the KL to the clean prediction), so "
                             f"`train_attack.loss` must be 'ce' (unused), got {self.train_attack.loss!r}")
        if self.objective.paired and self.recipe in PAIRED_REFUSED:
            raise ValueError(f"`recipe`={self.recipe!r} cannot train objective {self.objective.name!r}: "
                             f"{PAIRED_REFUSED[self.recipe]}")

    @property
    def attacks(self) -> bool:
        """Whether a step attacks any row: the recipe attacks (not ``standard``) and ``train_attack`` is enabled."""
        return RECIPES[self.recipe].attack != "none" and self.train_attack.enabled


# Recipes that make no sense with a paired objective (TRADES, MART), and why.
PAIRED_REFUSED = {
    "standard": "it attacks no row, and the objective needs an adversarial example per sample; use 'robust'",
    "selective_ds": "with pairs the pool is the batch itself, so its data selection is recipe 'selective' with "
                    "`p_up` < 1; use that",
}


@dataclass
class SelectionRecord:
    """What one training step selected; the module keeps it as ``last_selection`` for the callbacks.

    Attributes:
        y: labels of the pool, shape ``(P,)``.
        is_adv: whether each pool row is adversarial, shape ``(P,)``.
        selected: indices into the pool of the backpropagated rows, shape ``(S,)``.
        pool_scores: per-sample cross-entropy of the pool if a scoring pass ran, else ``None``.
        attacked: indices into the clean batch of the attacked rows.
        attack_scores: pre-attack scores of the clean batch (selective recipes), else ``None``.
        batch_size: rows in the clean batch.
        logits: detached logits of the backpropagated rows from the training forward (before the update),
            aligned with ``selected``; ``None`` when this process selected no row.
        source: the clean-batch row each pool row was made from, shape ``(P,)``.
        index: the batch's dataset indices ``(B,)`` when it carries them (``return_index=True``), else ``None``.
    """

    y: Tensor
    is_adv: Tensor
    selected: Tensor
    pool_scores: Tensor | None
    attacked: Tensor
    attack_scores: Tensor | None
    batch_size: int
    logits: Tensor | None = None
    source: Tensor | None = None
    index: Tensor | None = None


@dataclass
class Pool:
    """The rows the post-attack selection chooses from.

    Attributes:
        x: inputs, shape ``(P, ...)``.
        y: labels, shape ``(P,)``.
        is_adv: whether each row is an adversarial example, shape ``(P,)``.
        source: the clean-batch row each pool row was made from, shape ``(P,)``.
        partner: for the ``"pairs"`` pool of a paired objective, each row's adversarial example (the clean
            input itself for a row that was not attacked), else ``None``.
        n_adv: how many rows are adversarial. Give it when the host knows it (:func:`build_pool` does: the
            attacked rows); left ``None``, it is counted on the device, which waits for it.
    """

    x: Tensor
    y: Tensor
    is_adv: Tensor
    source: Tensor
    partner: Tensor | None = None
    n_adv: int | None = None

    def __post_init__(self) -> None:
        if self.n_adv is None:
            self.n_adv = int(self.is_adv.sum())

    def subset(self, rows: Tensor) -> Pool:
        """The pool's rows ``rows`` (distinct, ascending indices). Their adversarial count is known on the host
        when every row is kept or the pool is all of one kind; otherwise which rows a selection kept decides
        it, and it is read from the device once."""
        n, kept = self.x.shape[0], rows.numel()
        if kept == n or self.n_adv == 0:  # every row, or no adversarial row to keep
            n_adv = self.n_adv
        elif self.n_adv == n:  # every kept row is adversarial
            n_adv = kept
        else:  # which rows were kept decides it: counted on the device (__post_init__)
            n_adv = None
        return Pool(x=self.x[rows], y=self.y[rows], is_adv=self.is_adv[rows], source=self.source[rows],
                    partner=None if self.partner is None else self.partner[rows], n_adv=n_adv)

    def adversarial_rows(self) -> Tensor:
        """Ascending indices of the adversarial rows, without a device read."""
        return selection.mask_indices(self.is_adv, self.n_adv)

    def clean_rows(self) -> Tensor:
        """Ascending indices of the clean rows, without a device read."""
        return selection.mask_indices(~self.is_adv, self.x.shape[0] - self.n_adv)


@dataclass
class StepCost:
    """The work one step did, in rows (counted from what ran, not measured).

    Attributes:
        attack_grad_steps: sample-gradient steps of the training attack (attacked rows x steps x restarts).
        forward_rows: rows through a forward pass of the model outside the attack: no-grad scoring passes and
            the training forward.
        backward_rows: rows through the backward pass into the parameters (the selected rows).
    """

    attack_grad_steps: int = 0
    forward_rows: int = 0
    backward_rows: int = 0


@dataclass
class StepResult:
    """The outcome of :func:`adversarial_step`.

    Attributes:
        loss: the training loss over the selected rows (attached to the graph), a scalar.
        record: what was attacked and selected.
        pool_logits: logits of the whole pool from the no-grad scoring pass, when one ran, else ``None``.
        k_global: under :class:`GlobalScope`, rows selected over all processes; ``None`` under :data:`LOCAL`.
        cost: the work the step did on this process.
    """

    loss: Tensor
    record: SelectionRecord
    pool_logits: Tensor | None
    k_global: int | None = None
    cost: StepCost = field(default_factory=StepCost)


# ------------------------------------------------------------------------------------------------- scopes
ScoresFn = Callable[[], Tensor]


class LocalScope:
    """Each process keeps the top ``p_up`` of its own pool and averages the loss over its own selected rows."""

    def select(self, n: int, p_up: float, device: torch.device, scores: ScoresFn, random: bool,
               generator: torch.Generator | None) -> tuple[Tensor, int | None]:
        """Indices into the pool of the rows to backpropagate, and ``None`` (no global count)."""
        k = selection.fraction_count(n, p_up)
        if k == n:
            return torch.arange(n, device=device), None
        if random:
            return selection.random_k(n, k, device=device, generator=generator), None
        return selection.top_k(scores(), k), None

    def loss(self, logits: Tensor, y: Tensor, k_global: int | None, label_smoothing: float = 0.0) -> Tensor:
        """The mean cross-entropy over this process's selected rows."""
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing)

    def reduce(self, per_sample: Tensor, k_global: int | None) -> Tensor:
        """The mean of per-sample losses over this process's selected rows."""
        return per_sample.mean()


@dataclass(frozen=True)
class GlobalScope:
    """Processes agree on the top ``p_up`` of the global pool (:func:`distributed.global_selection`).

    Attributes:
        strategy: the Lightning strategy (``trainer.strategy``), which gathers the scores of every process.
    """

    strategy: Any

    def select(self, n: int, p_up: float, device: torch.device, scores: ScoresFn, random: bool,
               generator: torch.Generator | None) -> tuple[Tensor, int | None]:
        """This process's rows of the global selection, and how many rows all processes select together."""
        if random:  # uniform scores: their global top k is a uniformly random subset of the global pool
            scores = partial(selection.uniform_scores, n, device, generator)
        selected, _, k_global = distributed.global_selection(self.strategy, n, p_up, device, scores)
        return selected, k_global

    def loss(self, logits: Tensor, y: Tensor, k_global: int | None, label_smoothing: float = 0.0) -> Tensor:
        """The summed cross-entropy, scaled so that DDP's gradient average is the mean over ``k_global`` rows."""
        scale = distributed.global_loss_scale(self.strategy, k_global)
        return F.cross_entropy(logits, y, reduction="sum", label_smoothing=label_smoothing) * scale

    def reduce(self, per_sample: Tensor, k_global: int | None) -> Tensor:
        """Summed per-sample losses, scaled so that DDP's gradient average is the mean over ``k_global`` rows."""
        return per_sample.sum() * distributed.global_loss_scale(self.strategy, k_global)


LOCAL = LocalScope()

# The profiler ranges of a step's stages (``torch.profiler.record_function``; without an active profiler a
# range is one cheap call): the pre-attack scoring pass, the attack, the pool and its scoring pass, the
# training forward of the selected rows. ``benchmarks/speed.py --profile`` reads them.
PHASES = {"score_batch": "advsel/score_batch", "attack": "advsel/attack", "score_pool": "advsel/score_pool",
          "loss": "advsel/loss"}


# --------------------------------------------------------------------------------------------------- step
def adversarial_step(model: nn.Module, x: Tensor, y: Tensor, settings: StepSettings,
                     generator: torch.Generator | None = None,
                     scope: LocalScope | GlobalScope = LOCAL, attacker: Attacker | None = None) -> StepResult:
    """Attack, select, and return the loss over the selected rows (not yet backpropagated) with its record.

    Args:
        model: the classifier, inputs in [0, 1], logits ``(B, C)``; its train/eval mode is left as found.
        x: clean inputs in [0, 1], shape ``(B, ...)``. Not checked here (the attack runs
            :meth:`~lightning_advsel.attacks.AttackConfig.unchecked`, no host sync per step): check a batch once
            with ``settings.train_attack.check_batch(x, y)``, as the module does with its first batch.
        y: integer labels, shape ``(B,)``.
        settings: the recipe and its fractions, score, attack and objective.
        generator: random generator for PGD starts and random picks (``None``: the global generator).
        scope: :data:`LOCAL`, or :class:`GlobalScope` to select over all DDP processes.
        attacker: what runs the training attack (:class:`Attacker`); ``None``: :func:`eager_attack`. A
            :class:`~lightning_advsel.compiled_attack.CompiledPGD` runs it as one compiled graph.

    Returns:
        The loss, the selection record (``index`` unset: the caller knows its batch), the scoring logits and
        the work done.
    """
    cost = StepCost()
    pool_kind = "pairs" if settings.objective.paired else RECIPES[settings.recipe].pool
    if settings.clean_rows == "all":  # the whole clean batch next to the attacked rows
        pool_kind = "append"
    with record_function(PHASES["score_batch"]):
        attacked, attack_scores, clean_logits = rows_to_attack(model, x, y, settings, generator, cost)
    with record_function(PHASES["attack"]):
        x_adv = attack(model, x, y, attacked, settings, generator, cost, attacker or eager_attack)
    with record_function(PHASES["score_pool"]):
        pool = build_pool(x, y, attacked, x_adv, pool_kind)
        selected, pool_scores, pool_logits, k_global, scoring_logits = select_pool(
            model, pool, settings, x_adv, clean_logits, generator, scope, cost)
    shared = scoring_logits if settings.selection_forward == "shared" else None
    with record_function(PHASES["loss"]):
        loss, logits = selected_loss(model, pool, selected, k_global, settings, scope, cost, shared)
    record = SelectionRecord(
        y=pool.y, is_adv=pool.is_adv, selected=selected, pool_scores=pool_scores, attacked=attacked,
        attack_scores=attack_scores, batch_size=x.shape[0], logits=None if logits is None else logits.detach(),
        source=pool.source,
    )
    return StepResult(loss=loss, record=record, pool_logits=pool_logits, k_global=k_global, cost=cost)


def rows_to_attack(model: nn.Module, x: Tensor, y: Tensor, settings: StepSettings,
                   generator: torch.Generator | None,
                   cost: StepCost | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Rows of the clean batch to attack, their pre-attack scores, and the clean logits of the scoring pass.

    Scores and logits are ``None`` for the recipes that attack no row or every row (no scoring pass runs).
    """
    n = x.shape[0]
    if not settings.attacks:
        return torch.zeros(0, dtype=torch.long, device=x.device), None, None
    kind = RECIPES[settings.recipe].attack
    if kind == "all":
        return torch.arange(n, device=x.device), None, None
    score = selection.PRE_ATTACK_SCORES[settings.attack_score]
    scoring = selection.scoring_pass(model, x, y, settings.scoring_mode, generator,
                                     features=score.needs_features, who=f"`attack_score`={settings.attack_score!r}")
    scores = score.fn(scoring).detach()
    k = selection.fraction_count(n, settings.attack_frac)
    if settings.attack_sampling == "proportional" and k < n:
        picked = score.sample(scores, k, generator)
    else:
        picked = score.pick(scores, k)
    if cost is not None:  # the scoring pass; the exact gradient match forwards (and backpropagates) once more
        cost.forward_rows += n * (2 if settings.attack_score == "gradmatch_exact" else 1)
    return picked, scores, scoring.logits


class Attacker(Protocol):
    """What runs a step's training attack: :func:`eager_attack`, or the compiled
    :class:`~lightning_advsel.compiled_attack.CompiledPGD`, which gives the same examples from the same draws."""

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, attack: AttackConfig,
                 generator: torch.Generator | None, objective: Objective) -> Tensor: ...


def eager_attack(model: nn.Module, x: Tensor, y: Tensor, attack: AttackConfig, generator: torch.Generator | None,
                 objective: Objective) -> Tensor:
    """``attack`` on ``(x, y)``, maximising ``objective``'s attack loss (TRADES: the KL to the clean prediction),
    unchecked: the settings were checked when built and the batch by the caller (the module, on its first batch),
    so no per-step host syncs of pgd's input checks."""
    loss = objective.attack_loss(model, x, attack.mode)
    # Only a paired objective passes its loss and start, so an attack that does not take them keeps working.
    extra = {} if loss is None and objective.start_std is None else {"loss": loss, "start_std": objective.start_std}
    return attack.unchecked(model, x, y, generator=generator, **extra)


def attack(model: nn.Module, x: Tensor, y: Tensor, attacked: Tensor, settings: StepSettings,
           generator: torch.Generator | None, cost: StepCost | None = None,
           attacker: Attacker = eager_attack) -> Tensor | None:
    """Adversarial examples of the ``attacked`` rows, maximising the objective's attack loss (``None``: no row)."""
    if not attacked.numel():
        return None
    train, objective = settings.train_attack, settings.objective
    if cost is not None:  # TRADES forwards the attacked rows once more, for the clean prediction its loss reads
        cost.attack_grad_steps += attacked.numel() * train.steps * train.restarts
        cost.forward_rows += attacked.numel() if objective.attacks_kl else 0
    return attacker(model, x[attacked], y[attacked], train, generator, objective)


def build_pool(x: Tensor, y: Tensor, attacked: Tensor, x_adv: Tensor | None, kind: str) -> Pool:
    """The pool: the clean batch with the adversarial rows put in place (``"replace"``), appended
    (``"append"``), or paired with their clean rows (``"pairs"``, for TRADES and MART)."""
    n = x.shape[0]
    rows = torch.arange(n, device=x.device)
    is_adv = torch.zeros(n, dtype=torch.bool, device=x.device)
    n_adv = 0 if x_adv is None else attacked.numel()
    if kind == "pairs":
        partner = x.clone()
        if x_adv is not None:
            partner[attacked] = x_adv
            is_adv[attacked] = True
        return Pool(x=x, y=y, is_adv=is_adv, source=rows, partner=partner, n_adv=n_adv)
    if x_adv is None:
        return Pool(x=x, y=y, is_adv=is_adv, source=rows, n_adv=0)
    if kind == "replace":
        pool_x = x.clone()
        pool_x[attacked] = x_adv
        is_adv[attacked] = True
        return Pool(x=pool_x, y=y, is_adv=is_adv, source=rows, n_adv=n_adv)
    return Pool(x=torch.cat([x, x_adv]), y=torch.cat([y, y[attacked]]),
                is_adv=torch.cat([is_adv, torch.ones_like(attacked, dtype=torch.bool)]),
                source=torch.cat([rows, attacked]), n_adv=n_adv)


def select_pool(model: nn.Module, pool: Pool, settings: StepSettings, x_adv: Tensor | None,
                clean_logits: Tensor | None, generator: torch.Generator | None,
                scope: LocalScope | GlobalScope = LOCAL,
                cost: StepCost | None = None
                ) -> tuple[Tensor, Tensor | None, Tensor | None, int | None, Tensor | None]:
    """The post-attack selection: indices of the pool rows to backpropagate.

    Rows are scored by their training objective in a no-grad pass: the per-sample cross-entropy, or for a
    paired objective the per-pair objective (:func:`pair_losses`).

    Returns:
        ``(selected, pool_scores, pool_logits, k_global, scoring_logits)``: ascending indices into the pool; the
        per-sample scores and the (detached) logits of the scoring pass when one ran (else ``None``; for pairs,
        the logits of each row's training input); the global count under :class:`GlobalScope` (else ``None``);
        the scoring logits as computed (with gradients under ``selection_forward="shared"``).
    """
    recipe = RECIPES[settings.recipe]
    scored: dict[str, Tensor] = {}

    def loss_scores() -> Tensor:
        if settings.selection_forward == "shared":  # the training forward itself, with gradients
            scored["logits"] = model(pool.x)
            if cost is not None:
                cost.forward_rows += pool.x.shape[0]
            scored["scores"] = selection.per_sample_loss(scored["logits"].detach(), pool.y)
            return scored["scores"]
        with torch.no_grad(), model_mode(model, settings.scoring_mode):
            if pool.partner is not None:
                scores, scored["logits"] = pair_losses(model, pool, settings.objective)
                scored["scores"] = scores
                rows = pool.x.shape[0] + pool.n_adv
            elif recipe.pool == "append" and clean_logits is not None and x_adv is not None:
                scored["logits"] = torch.cat([clean_logits, model(x_adv)])
                rows = x_adv.shape[0]
            else:
                scored["logits"] = model(pool.x)
                rows = pool.x.shape[0]
        if cost is not None:
            cost.forward_rows += rows
        if "scores" not in scored:
            scored["scores"] = selection.per_sample_loss(scored["logits"], pool.y)
        return scored["scores"]

    selected, k_global = scope.select(pool.x.shape[0], settings.p_up, pool.x.device, loss_scores,
                                      random=recipe.post == "random", generator=generator)
    logits = scored.get("logits")
    return selected, scored.get("scores"), None if logits is None else logits.detach(), k_global, logits


def pair_losses(model: nn.Module, pool: Pool, objective: Objective) -> tuple[Tensor, Tensor]:
    """Per-pair objective of a ``"pairs"`` pool, and the logits of each row's training input.

    An attacked row's loss is the paired objective of its clean input and adversarial example; a row that
    was not attacked (selective recipes) is trained on its clean cross-entropy. The returned logits are the
    adversarial example's for attacked rows and the clean input's for the others.
    """
    clean = model(pool.x)
    adv_rows = pool.adversarial_rows()
    logits = clean.clone() if adv_rows.numel() else clean
    losses = F.cross_entropy(clean.float(), pool.y, reduction="none")
    if adv_rows.numel():
        adv = model(pool.partner[adv_rows])
        losses = losses.index_put((adv_rows,), objective.pair_loss(clean[adv_rows], adv, pool.y[adv_rows]))
        logits = logits.index_put((adv_rows,), adv)
    return losses, logits


def selected_loss(model: nn.Module, pool: Pool, selected: Tensor, k_global: int | None,
                  settings: StepSettings | None = None, scope: LocalScope | GlobalScope = LOCAL,
                  cost: StepCost | None = None, shared_logits: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Training loss over the selected rows and their logits (``None`` when this process selected none).

    ``shared_logits``: the whole pool's logits from a forward with gradients (``selection_forward="shared"``);
    the loss is then taken from them instead of a forward of the selected rows.
    """
    if selected.numel() == 0:
        # No row of this process passed the global threshold. A backward touching every parameter (with zero
        # gradient) still runs, so this process joins DDP's gradient all-reduce and nobody hangs.
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.stack([p.sum() for p in params]).sum() * 0.0, None
    settings = settings or StepSettings()
    objective, clean_weight = settings.objective, settings.clean_weight
    if pool.partner is not None:
        chosen = pool.subset(selected)
        losses, logits = pair_losses(model, chosen, objective)
        rows, loss = selected.numel() + chosen.n_adv, scope.reduce(
            losses * clean_weights(chosen.is_adv, clean_weight), k_global)
    elif shared_logits is not None:
        logits = shared_logits[selected]
        losses = F.cross_entropy(logits, pool.y[selected], reduction="none", label_smoothing=objective.label_smoothing)
        loss = scope.reduce(losses * clean_weights(pool.is_adv[selected], clean_weight), k_global)
        if cost is not None:  # the forward was counted when scoring; the backward runs through all of it
            cost.backward_rows += pool.x.shape[0]
        return loss, logits
    elif settings.clean_rows == "all":  # mean adversarial loss + clean_weight x mean clean loss
        chosen = pool.subset(selected)
        logits = model(chosen.x)
        losses = F.cross_entropy(logits, chosen.y, reduction="none", label_smoothing=objective.label_smoothing)
        rows, loss = selected.numel(), clean_weight * losses[chosen.clean_rows()].mean()
        if chosen.n_adv:
            loss = losses[chosen.adversarial_rows()].mean() + loss
    elif clean_weight != 1:
        logits = model(pool.x[selected])
        losses = F.cross_entropy(logits, pool.y[selected], reduction="none", label_smoothing=objective.label_smoothing)
        rows, loss = selected.numel(), scope.reduce(losses * clean_weights(pool.is_adv[selected], clean_weight),
                                                    k_global)
    else:
        logits = model(pool.x[selected])
        rows, loss = selected.numel(), scope.loss(logits, pool.y[selected], k_global, objective.label_smoothing)
    if cost is not None:
        cost.forward_rows += rows
        cost.backward_rows += rows
    return loss, logits


def clean_weights(is_adv: Tensor, clean_weight: float) -> Tensor:
    """Per-row loss weights: 1 for adversarial rows, ``clean_weight`` for clean ones."""
    return torch.where(is_adv, 1.0, clean_weight)


# ----------------------------------------------------------------------------------------------- contract
@runtime_checkable
class SelectionModule(Protocol):
    """What the callbacks read from a LightningModule: ours, or a user's own that calls :func:`adversarial_step`.

    Attributes:
        model: the classifier being trained (inputs in [0, 1], unless the module also has a ``pixel_model``
            taking pixels and a ``read_batch`` giving them, as
            :class:`~lightning_advsel.AdversarialSelectionModule` with ``input_normalization`` does).
        num_classes: classes of the task.
        settings: the step's settings (recipe, fractions, score, training attack, scoring mode).
        p_up: the fraction backpropagated now; :class:`~lightning_advsel.callbacks.AdaptivePUp` writes it.
        last_selection: the record of the last training step, ``None`` before the first.
    """

    model: nn.Module
    num_classes: int
    settings: StepSettings
    p_up: float
    last_selection: SelectionRecord | None


def check_selection_module(module: Any, who: str) -> None:
    """Raise unless ``module`` provides :class:`SelectionModule`'s attributes.

    Args:
        module: the LightningModule a callback is attached to.
        who: the callback's name, for the message.

    Raises:
        TypeError: naming the missing attributes.
    """
    missing = [name for name in SelectionModule.__annotations__ if not hasattr(module, name)]
    if missing:
        raise TypeError(
            f"{who} needs a LightningModule with the attributes of lightning_advsel.step.SelectionModule "
            f"({', '.join(SelectionModule.__annotations__)}); {type(module).__name__} lacks {', '.join(missing)}"
        )
