"""FLOPs of one training step of every recipe, relative to ``robust`` (Madry PGD-k training).

Counted with :class:`torch.utils.flop_counter.FlopCounterMode` around ``training_step`` (scoring passes,
attack, training forward and backward; the optimizer update is elementwise and not counted). FLOPs are a
property of the shapes, not of the machine, so the table is the same on CPU and GPU. Analytic reference for
``selective`` at ``attack_frac`` 0.5, with a forward as 1 unit and a backward as 2 (1 for the attack's
input-only backward): ``(k + 4) / (2k + 3)`` of PGD-k training, 0.61 for k = 10.

The ``gradmatch_exact`` row is overstated: ``vmap`` computes per-sample convolution weight gradients as one
convolution grouped by sample, whose weight gradient ``FlopCounterMode`` counts as if ungrouped.

    python benchmarks/flops_per_step.py                # SmallCNN on 8x8 digits-sized inputs, batch 64
    python benchmarks/flops_per_step.py --resnet18     # ResNet-18 on 32x32 inputs, batch 16 (slow on CPU)
"""

from __future__ import annotations

import argparse
import warnings

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from lightning_advsel import AdversarialSelectionModule, AttackConfig
from lightning_advsel.models import ResNet18, SmallCNN

# (row label, recipe, p_up, attack_score, objective[, selection_forward])
ROWS = [
    ("standard", "standard", 1.0, "margin", "ce"),
    ("robust", "robust", 1.0, "margin", "ce"),
    ("ds (p_up 0.5)", "ds", 0.5, "margin", "ce"),
    ("ds (p_up 0.5, shared forward)", "ds", 0.5, "margin", "ce", "shared"),
    ("ds (p_up 1)", "ds", 1.0, "margin", "ce"),
    ("random (p_up 0.5)", "random", 0.5, "margin", "ce"),
    ("selective margin", "selective", 1.0, "margin", "ce"),
    ("selective gradmatch", "selective", 1.0, "gradmatch", "ce"),
    ("selective gradmatch_exact", "selective", 1.0, "gradmatch_exact", "ce"),
    ("selective_ds margin (p_up 0.5)", "selective_ds", 0.5, "margin", "ce"),
    *[(f"{recipe} {objective.upper()}{label}", recipe, p_up, "margin", objective)
      for objective in ("trades", "mart")
      for recipe, p_up, label in (("robust", 1.0, ""), ("ds", 0.5, " (p_up 0.5)"), ("selective", 1.0, " margin"))],
]


def analytic_units(recipe: str, p_up: float, attack_score: str, objective: str, k: int,
                   selection_forward: str = "separate") -> float | None:
    """Per-sample cost of a step in units of one forward (backward = 2, the attack's input-only backward = 1).

    The floor a recipe's work implies: the attack (``2k`` per attacked row, plus one no-grad forward for the
    TRADES target), the no-grad scoring passes, and a forward and backward (3) per trained input (two per
    selected pair for TRADES and MART). ``None`` where the counting is not this simple (``gradmatch_exact``).
    """
    if attack_score == "gradmatch_exact":
        return None
    paired = objective != "ce"
    attacked = {"standard": 0.0, "selective": 0.5, "selective_ds": 0.5}.get(recipe, 1.0)
    units = attacked * 2 * k + (attacked if objective == "trades" else 0.0)
    units += 1.0 if recipe.startswith("selective") else 0.0  # the pre-attack scoring pass
    if paired:  # pairs: the clean input of every row, the adversarial one of each attacked row
        inputs = 1.0 + attacked
        scored = inputs if p_up < 1 else 0.0
        return units + scored + 3 * p_up * inputs
    pool = 1.0 + attacked if recipe in ("ds", "random", "selective_ds") else 1.0
    if selection_forward == "shared" and p_up < 1:  # one forward with gradients over the pool, one backward
        return units + 3 * pool
    if p_up < 1 and recipe != "random":  # the scoring pass over the pool (selective_ds reuses the clean logits)
        units += attacked if recipe == "selective_ds" else pool
    return units + 3 * p_up * pool


def step_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: str, *, p_up: float = 1.0,
               attack_score: str = "margin", attack_frac: float = 0.5, steps: int = 10, objective: str = "ce",
               selection_forward: str = "separate") -> int:
    """FLOPs of the first training step of ``recipe`` on the batch ``(x, y)`` with a PGD-``steps`` attack."""
    module = AdversarialSelectionModule(
        model, recipe=recipe, p_up=p_up, attack_score=attack_score, attack_frac=attack_frac,
        train_attack=AttackConfig(eps=0.1, alpha=0.025, steps=steps, mode="train"), eval_attack=None,
        objective=objective, selection_forward=selection_forward,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.01),
    )
    counted: dict[str, int] = {}
    original = module.training_step

    def counted_step(*args, **kwargs):
        with FlopCounterMode(display=False) as counter:
            out = original(*args, **kwargs)
        counted["flops"] = counter.get_total_flops()
        return out

    module.training_step = counted_step
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu", devices=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=x.shape[0]))
    return counted["flops"]


def table(make_model, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[tuple[str, int, float, float | None]]:
    """``(label, FLOPs per step, relative to robust, analytic relative)`` for every row of :data:`ROWS`."""
    flops, floors = {}, {}
    for label, recipe, p_up, score, objective, *forward in ROWS:
        torch.manual_seed(0)
        flops[label] = step_flops(make_model(), x, y, recipe, p_up=p_up, attack_score=score, steps=steps,
                                  objective=objective, selection_forward=forward[0] if forward else "separate")
        floors[label] = analytic_units(recipe, p_up, score, objective, steps, *forward)
    robust = floors["robust"]
    return [(label, f, f / flops["robust"], None if floors[label] is None else floors[label] / robust)
            for label, f in flops.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resnet18", action="store_true", help="ResNet-18 on 32x32 inputs instead of SmallCNN")
    parser.add_argument("--steps", type=int, default=10, help="PGD steps of the training attack")
    parser.add_argument("--batch-size", type=int, default=None, help="clean samples per batch")
    args = parser.parse_args()
    if args.resnet18:
        make_model, shape, batch = ResNet18, (3, 32, 32), args.batch_size or 16
    else:
        make_model, shape, batch = SmallCNN, (1, 8, 8), args.batch_size or 64
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)
    rows = table(make_model, x, y, args.steps)
    k = args.steps
    print(f"{make_model.__name__}, batch {batch}, inputs {'x'.join(map(str, shape))}, PGD-{k}, attack_frac 0.5; "
          f"analytic selective / robust = (k + 4) / (2k + 3) = {(k + 4) / (2 * k + 3):.3f}\n")
    print("| recipe | FLOPs per step | relative to robust | analytic |")
    print("| --- | ---: | ---: | ---: |")
    for label, flops, rel, floor in rows:
        print(f"| {label} | {flops:,} | {rel:.3f} | {'-' if floor is None else f'{floor:.3f}'} |")


if __name__ == "__main__":
    main()
