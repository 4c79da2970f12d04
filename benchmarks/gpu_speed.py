"""ResNet-18 PGD-10 training on CIFAR-10-shaped data on a GPU: images per second per recipe and the share of the
machine's bf16 dense peak the training reaches.

Per recipe (robust, ds at p_up 0.5, selective margin and selective_ds at attack_frac 0.5), the module trains
``--warmup`` + ``--steps`` batches of random 3x32x32 images (generated on the device, so no data loading is
timed) under the Trainer's ``--precision`` (``bf16-mixed`` by default) with ``channels_last`` weights (and
``torch.compile`` with ``--compile``). The timed steps are read after a device sync; the first ``--warmup`` steps
(cuDNN autotuning, lazy initialization, compilation) are left out. FLOPs per step come from
``torch.utils.flop_counter.FlopCounterMode`` around the first training step (``flop_count.CountFlops``); the
peak is measured on the machine itself with a large bf16 matmul (``--matmul-size``), so the share is
``FLOPs per step x steps per second / measured peak``. The whole script is meant to finish within 5 minutes on
an H100-class GPU (it prints its wall time; ``--compile`` adds a compilation per recipe); it needs torch,
lightning and this package only::

    python benchmarks/gpu_speed.py                          # CUDA, bf16-mixed, channels_last
    python benchmarks/gpu_speed.py --compile --json gpu.json
    python benchmarks/gpu_speed.py --device cpu --quick --precision 32-true   # the code path on CPU
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from flop_count import CountFlops
from lightning.pytorch.callbacks import Callback
from speed import append_json, machine, make_trainer, now
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

from lightning_advsel import AdversarialSelectionModule, AttackConfig
from lightning_advsel.models import ResNet18

# (label, recipe, p_up); selective recipes attack half of each batch, chosen by the logit margin.
RECIPES = [("robust", "robust", 1.0), ("ds p_up 0.5", "ds", 0.5), ("selective margin", "selective", 1.0),
           ("selective_ds margin", "selective_ds", 0.5)]
PRECISIONS = ["bf16-mixed", "16-mixed", "32-true"]


class StepClock(Callback):
    """The time at the end of every training batch, after a device sync."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.marks.append(now(trainer.strategy.root_device))


def matmul_peak(device: torch.device, size: int, repeats: int = 20) -> float:
    """FLOP/s of a ``size`` x ``size`` bf16 matmul on ``device``: the dense peak this machine reaches."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start = now(device)
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (now(device) - start)


def run_recipe(recipe: str, p_up: float, args: argparse.Namespace, root: str) -> dict:
    """Train ``warmup + steps`` batches of ``recipe``; images per second over the timed steps, FLOPs per step."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    n = args.batch_size * (args.warmup + args.steps)
    images = TensorDataset(torch.rand(n, 3, 32, 32, device=device), torch.randint(0, 10, (n,), device=device))
    # One gather per batch on the device (the dataset is indexed with the batch's indices), not one per image.
    data = DataLoader(images, sampler=BatchSampler(SequentialSampler(images), args.batch_size, drop_last=True),
                      batch_size=None)
    module = AdversarialSelectionModule(
        ResNet18(), recipe=recipe, p_up=p_up, attack_frac=0.5, attack_score="margin",
        train_attack=AttackConfig(eps=8 / 255, alpha=2 / 255, steps=args.pgd_steps, mode="train"), eval_attack=None,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
        channels_last=args.channels_last, compile_model=args.compile)
    clock, flops = StepClock(), CountFlops(steps_per_epoch=1)
    trainer = make_trainer(args.device, args.warmup + args.steps, [flops, clock], root, precision=args.precision,
                           max_steps=args.warmup + args.steps)
    trainer.fit(module, data)
    seconds = clock.marks[-1] - clock.marks[args.warmup - 1] if args.warmup else clock.marks[-1] - clock.marks[0]
    timed = args.steps if args.warmup else args.steps - 1
    step_flops = flops.per_epoch[0] / trainer.num_training_batches
    return {"images_per_s": timed * args.batch_size / seconds, "ms_per_step": 1000 * seconds / timed,
            "flops_per_step": step_flops, "flops_per_s": step_flops * timed / seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16-mixed")
    parser.add_argument("--batch-size", type=int, default=256, help="clean images per batch")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per recipe")
    parser.add_argument("--pgd-steps", type=int, default=10, help="steps of the training attack")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile", action="store_true", help="compile the model (torch.compile)")
    parser.add_argument("--matmul-size", type=int, default=8192, help="side of the bf16 matmul measuring the peak")
    parser.add_argument("--json", type=Path, default=None, help="append the results to this JSON list")
    parser.add_argument("--quick", action="store_true",
                        help="batch 2, PGD-2, 1 + 2 steps, a small matmul: checks that it runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.warmup, args.steps, args.matmul_size, args.pgd_steps = 2, 1, 2, 256, 2
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu --quick to check the code path")
    for name in ("batch_size", "steps", "matmul_size", "pgd_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup == 0 and args.steps < 2:
        parser.error("--steps must be >= 2 without warm-up steps (the first one starts the clock)")
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|LeafSpec|val_dataloader).*")
    started = time.perf_counter()
    peak = matmul_peak(torch.device(args.device), args.matmul_size)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for label, recipe, p_up in RECIPES:
            rows.append({"recipe": label, **run_recipe(recipe, p_up, args, root)})
    for row in rows:
        row["peak_share"] = row["flops_per_s"] / peak
    print(f"ResNet-18, PGD-{args.pgd_steps}, batch {args.batch_size}, {args.precision}, "
          f"channels_last {args.channels_last}, compile {args.compile}; {machine(args.device)}; "
          f"bf16 matmul peak {peak / 1e12:.1f} TFLOP/s ({args.matmul_size}^2)\n")
    print("| recipe | images / s | ms / step | GFLOP / step | share of the bf16 peak |\n"
          "| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['recipe']} | {r['images_per_s']:.0f} | {r['ms_per_step']:.1f} | {r['flops_per_step'] / 1e9:.1f} | "
              f"{r['peak_share']:.1%} |")
    print(f"\nwhole script: {time.perf_counter() - started:.0f} s")
    record = {"machine": machine(args.device), "precision": args.precision, "batch_size": args.batch_size,
              "channels_last": args.channels_last, "compile": args.compile, "steps": args.steps,
              "peak_flops": peak, "quick": args.quick, "rows": rows}
    if args.json is not None:
        append_json(args.json, record)
    return record


if __name__ == "__main__":
    main()
