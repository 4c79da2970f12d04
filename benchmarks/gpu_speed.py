"""ResNet-18 PGD-10 training on CIFAR-10-shaped data on a GPU: images per second per recipe and the share of the
machine's bf16 dense peak the training reaches.

Per recipe (robust, ds at p_up 0.5, selective margin and selective_ds at attack_frac 0.5), the module trains
``--warmup`` + ``--steps`` batches of random 3x32x32 images (``--image-size`` pixels per side; generated on the
device, so no data loading is timed) under the Trainer's ``--precision`` (``bf16-mixed`` by default) with
``channels_last`` weights (and ``torch.compile`` with ``--compile``). The clock is read after a device sync at the
two ends of the timed steps only, so that they queue their work ahead as in a real run; the first ``--warmup`` steps
(cuDNN autotuning, lazy initialization, compilation) are left out. FLOPs per step come from
``torch.utils.flop_counter.FlopCounterMode`` around the second training step (``flop_count.CountFlops``); the peak
is measured on the machine itself with a large bf16 matmul (``--matmul-size``), so the share is ``FLOPs per step x
steps per second / measured peak``. Robust and ds also run as the hand-written loop of ``speed.py``
(``speed.plain_step``: the same network, images, optimizer, channels-last weights and, for ``bf16-mixed``,
``torch.autocast`` around the forwards), right after the module's run, for the module's overhead in images per
second (target: >= 0.95 of the loop's; no loop under ``16-mixed``, which would need a GradScaler). Every recipe runs
``--rounds`` times, the module and the loop in turn (the loop first every other round): a table row is the median
over rounds, and a comparison the median of the rounds' ratios, so that a drift of the machine between runs (19%
between two runs on an H200) touches both sides. The whole script is meant to finish within 5 minutes on an
H100-class GPU (it prints its wall time; ``--compile`` adds a compilation per recipe and round); it needs torch,
lightning and this package only. ``--compile-mode reduce-overhead`` compiles the network (the module's and the
loop's alike) in that ``torch.compile`` mode, which replays a compiled graph's kernels as CUDA graphs: the lever
for a step that the host's kernel launches limit (the module's own ``compile_model`` uses the default mode)::

    python benchmarks/gpu_speed.py                          # CUDA, bf16-mixed, channels_last
    python benchmarks/gpu_speed.py --compile --json gpu.json
    python benchmarks/gpu_speed.py --compile-mode reduce-overhead --rounds 1 --json gpu.json   # CUDA graphs
    python benchmarks/gpu_speed.py --profile robust "selective margin"    # and where their steps' time goes
    python benchmarks/gpu_speed.py --device cpu --quick --precision 32-true   # the code path on CPU
    python benchmarks/gpu_speed.py --model wrn34_10          # another network: a configs/models/ overlay's name
"""

from __future__ import annotations

import argparse
import datetime
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from flop_count import CountFlops
from lightning.pytorch.callbacks import Callback
from speed import (
    ProfileSteps,
    append_json,
    machine,
    make_trainer,
    now,
    operator_events,
    plain_step,
    self_time_key,
    top_operators,
)
from torch.profiler import ProfilerActivity
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from lightning_advsel import AdversarialSelectionModule, AttackConfig
from lightning_advsel.models import ResNet18

CONFIG_DIR = Path(__file__).resolve().parents[1] / "lightning_advsel" / "configs"
# The default network, then the network overlays of configs/models/ by name.
MODELS = ["resnet18", *sorted(p.stem for p in (CONFIG_DIR / "models").glob("*.yaml"))]

# (label, recipe, p_up); selective recipes attack half of each batch, chosen by the logit margin.
RECIPES = [("robust", "robust", 1.0), ("ds p_up 0.5", "ds", 0.5), ("selective margin", "selective", 1.0),
           ("selective_ds margin", "selective_ds", 0.5)]
PRECISIONS = ["bf16-mixed", "16-mixed", "32-true"]
# The same two recipes as a hand-written loop (speed.plain_step), for the module's overhead on the GPU.
PLAIN = [("robust, plain loop", "robust", 1.0), ("ds p_up 0.5, plain loop", "ds", 0.5)]
TARGET_THROUGHPUT = 0.95  # module images/s over the plain loop's, at least
AUTOCAST = {"bf16-mixed": torch.bfloat16, "32-true": None}  # plain loop: 16-mixed would need a GradScaler


class StepClock(Callback):
    """The time at the end of the training batches ``at`` (batch indices), after a device sync: the ends of a
    timed window only, so that the steps inside it queue their work ahead as in a real run (a sync after every
    step would make each wait for the device, the plain loop's too)."""

    def __init__(self, at: tuple[int, int]) -> None:
        self.at = at
        self.marks: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx in self.at:
            self.marks.append(now(trainer.strategy.root_device))


def window(warmup: int, steps: int) -> tuple[int, int]:
    """The batch indices whose ends start and stop the clock: the last warm-up step and the last step (without a
    warm-up, the first step starts it)."""
    return (warmup - 1 if warmup else 0), warmup + steps - 1


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


def network(name: str) -> torch.nn.Module:
    """``ResNet18()`` for ``"resnet18"``, else the network ``configs/models/<name>.yaml`` selects, as the CLI builds
    it (``class_path`` and ``init_args``) for 10 classes."""
    if name == "resnet18":
        return ResNet18()
    import importlib

    import yaml

    spec = yaml.safe_load((CONFIG_DIR / "models" / f"{name}.yaml").read_text())["model"]["init_args"]["model"]
    module, cls = spec["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)(**spec.get("init_args", {}))


def random_images(args: argparse.Namespace, batches: int | None = None) -> DataLoader:
    """``batches`` (default ``warmup + steps``) batches of random CIFAR-10-shaped images and labels, made on the
    device."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    n = args.batch_size * (batches or args.warmup + args.steps)
    side = args.image_size  # pixels
    images = TensorDataset(torch.rand(n, 3, side, side, device=device), torch.randint(0, 10, (n,), device=device))
    # One gather per batch on the device (the dataset is indexed with the batch's indices), not one per image.
    return DataLoader(images, sampler=BatchSampler(SequentialSampler(images), args.batch_size, drop_last=True),
                      batch_size=None)


def train_attack(args: argparse.Namespace) -> AttackConfig:
    return AttackConfig(eps=8 / 255, alpha=2 / 255, steps=args.pgd_steps, mode="train")


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def throughput(marks: list[float], args: argparse.Namespace, step_flops: float) -> dict:
    """Images per second and FLOP/s over the timed window, from the times ``marks`` at its two ends."""
    first, last = window(args.warmup, args.steps)
    seconds, timed = marks[1] - marks[0], last - first
    return {"images_per_s": timed * args.batch_size / seconds, "ms_per_step": 1000 * seconds / timed,
            "flops_per_step": step_flops, "flops_per_s": step_flops * timed / seconds}


def recipe_of(label: str) -> tuple[str, float]:
    """The recipe and p_up of the row ``label`` of :data:`RECIPES`."""
    return next((r, q) for name, r, q in RECIPES if name == label)


def plain_label(recipe: str, p_up: float) -> str | None:
    """The plain loop's row for ``recipe`` at ``p_up`` (:data:`PLAIN`), ``None`` where the loop does not run it."""
    return next((name for name, r, q in PLAIN if (r, q) == (recipe, p_up)), None)


def format_tables(rows: list[dict], comparisons: list[dict]) -> str:
    """A result's throughput table and its module / plain loop comparisons, as markdown. The spreads over rounds
    are left blank in results made before rounds existed."""

    def spread(lo: float | None, hi: float | None, fmt: str) -> str:
        return "" if lo is None else f"{lo:{fmt}} - {hi:{fmt}}"

    lines = ["| recipe | images / s | spread (min - max) | ms / step | GFLOP / step | share of the bf16 peak |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['recipe']} | {r['images_per_s']:.0f} | "
              f"{spread(r.get('min_images_per_s'), r.get('max_images_per_s'), '.0f')} | {r['ms_per_step']:.1f} | "
              f"{r['flops_per_step'] / 1e9:.1f} | {r['peak_share']:.1%} |" for r in rows]
    if comparisons:
        lines += ["", "| comparison | median of the rounds' ratios | spread (min - max) | target |",
                  "| --- | ---: | ---: | --- |"]
        lines += [f"| {c['comparison']} | {c['measured']:.3f} | {spread(c.get('min'), c.get('max'), '.3f')} | "
                  f"{c['target']} |" for c in comparisons]
    return "\n".join(lines)


def median_run(runs: list[dict], peak: float) -> dict:
    """One recipe's throughput over rounds: the median round's figures (by images per second), the spread of the
    images per second, and the share of the bf16 ``peak``."""
    ranked = sorted(runs, key=lambda r: r["images_per_s"])
    mid = ranked[(len(ranked) - 1) // 2]
    return {**mid, "images_per_s": statistics.median(r["images_per_s"] for r in runs),
            "min_images_per_s": ranked[0]["images_per_s"], "max_images_per_s": ranked[-1]["images_per_s"],
            "peak_share": statistics.median(r["flops_per_s"] for r in runs) / peak}


def run_plain(recipe: str, p_up: float, args: argparse.Namespace) -> dict:
    """The plain loop's ``warmup + steps`` steps on the same images, network, optimizer and precision."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = network(args.model).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        model.compile(mode=args.compile_mode)
    model.train()
    optimizer, attack, marks = sgd(model.parameters()), train_attack(args), []
    step_flops, at = 0.0, window(args.warmup, args.steps)
    for i, (x, y) in enumerate(random_images(args)):
        if i == 1:  # FLOPs of the second step, as CountFlops counts the module's
            with FlopCounterMode(display=False) as counter:
                plain_step(model, optimizer, x, y, recipe, p_up, attack, AUTOCAST[args.precision])
            step_flops = float(counter.get_total_flops())
        else:
            plain_step(model, optimizer, x, y, recipe, p_up, attack, AUTOCAST[args.precision])
        if i in at:
            marks.append(now(device))
    return throughput(marks, args, step_flops)


def make_module(recipe: str, p_up: float, args: argparse.Namespace, **settings: Any) -> AdversarialSelectionModule:
    """The module of a recipe row; ``settings``: further module arguments (``host_work.py``'s other settings)."""
    net = network(getattr(args, "model", "resnet18"))  # host_work.py's arguments name no network
    own_mode = args.compile and getattr(args, "compile_mode", None) not in (None, "default")
    if own_mode:  # the module's option compiles in the default mode; another is applied here, as a user would
        net.compile(mode=args.compile_mode)
    return AdversarialSelectionModule(
        net, recipe=recipe, p_up=p_up, attack_frac=0.5, attack_score="margin",
        train_attack=train_attack(args), eval_attack=None, optimizer=sgd,
        channels_last=args.channels_last, compile_model=args.compile and not own_mode, **settings)


def profile_recipe(label: str, args: argparse.Namespace, root: str, top: int = 15) -> dict:
    """``--profile-steps`` steps of the recipe ``label`` after the warm-up under ``torch.profiler``: the top
    operators by self device time (self CPU time on a CPU), the share of the profiled wall time the device was
    busy with them (the profiler's own overhead lowers it a little), and the kernel launches per step. A low
    busy share with many launches per step says the host (Python, the framework, the launches) limits the step;
    a high one, the kernels themselves."""
    recipe, p_up = recipe_of(label)
    device = torch.device(args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    steps, clock = ProfileSteps(activities, start=args.warmup), StepClock(window(args.warmup, args.profile_steps))
    trainer = make_trainer(args.device, args.warmup + args.profile_steps, [steps, clock], root,
                           precision=args.precision, max_steps=args.warmup + args.profile_steps)
    trainer.fit(make_module(recipe, p_up, args), random_images(args, args.warmup + args.profile_steps))
    wall = clock.marks[1] - clock.marks[0]  # the profiled steps (main asks for a warm-up)
    events, attr = operator_events(steps.prof), self_time_key(args.device)
    busy = sum(getattr(e, attr) for e in events) / 1e6 / wall
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    print(f"\n## {label}: top {top} operators by self {'device' if device.type == 'cuda' else 'CPU'} time, "
          f"{args.profile_steps} steps\n")
    print(steps.prof.key_averages().table(sort_by=attr, row_limit=top))
    print(f"busy: {busy:.0%} of the profiled wall time; kernel launches per step: {launches / args.profile_steps:.0f}")
    return {"recipe": label, "steps": args.profile_steps, "busy_share": busy,
            "launches_per_step": launches / args.profile_steps,
            "top": top_operators(steps.prof, args.device, args.profile_steps, top)}


def run_recipe(recipe: str, p_up: float, args: argparse.Namespace, root: str) -> dict:
    """Train ``warmup + steps`` batches of ``recipe``; images per second over the timed steps, FLOPs per step."""
    data = random_images(args)
    module = make_module(recipe, p_up, args)
    clock, flops = StepClock(window(args.warmup, args.steps)), CountFlops(steps_per_epoch=1, skip=1)
    trainer = make_trainer(args.device, args.warmup + args.steps, [flops, clock], root, precision=args.precision,
                           max_steps=args.warmup + args.steps)
    trainer.fit(module, data)
    return throughput(clock.marks, args, flops.per_epoch[0] / trainer.num_training_batches)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--model", choices=MODELS, default="resnet18",
                        help="the network: ResNet-18, or a configs/models/ overlay's (preact_resnet18, wrn34_10, ...)")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16-mixed")
    parser.add_argument("--batch-size", type=int, default=256, help="clean images per batch")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per recipe and round")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of every recipe (default 3; 2 with --quick); each round runs the module and the "
                        "plain loop in turn (the loop first every other round), and a comparison is the median of "
                        "the rounds' ratios")
    parser.add_argument("--pgd-steps", type=int, default=10, help="steps of the training attack")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile", action="store_true", help="compile the model (torch.compile)")
    parser.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                        default=None, help="torch.compile's mode (implies --compile); reduce-overhead: CUDA graphs")
    parser.add_argument("--matmul-size", type=int, default=8192, help="side of the bf16 matmul measuring the peak")
    parser.add_argument("--json", type=Path, default=None, help="append the results to this JSON list")
    parser.add_argument("--profile", nargs="*", default=[], choices=[label for label, _, _ in RECIPES],
                        metavar="RECIPE", help="after the table: profile these recipes (see profile_recipe)")
    parser.add_argument("--profile-steps", type=int, default=5, help="profiled steps after the warm-up")
    parser.add_argument("--image-size", type=int, default=32,
                        help="pixels per side of the random images (CIFAR-10's 32; the network pools adaptively)")
    parser.add_argument("--quick", action="store_true",
                        help="batch 4, 8x8 images, PGD-2, 1 + 2 steps, 2 rounds, a small matmul: checks that it runs")
    args = parser.parse_args(argv)
    args.compile = args.compile or args.compile_mode is not None
    if args.quick:
        args.batch_size, args.warmup, args.steps, args.matmul_size, args.pgd_steps = 4, 1, 2, 256, 2
        args.rounds = 2 if args.rounds is None else args.rounds  # the second of 2 runs the plain loop first
        # 8x8 pixels: the same layers at an eighth of batch 2's work at 32x32; batch 4, so that the half of a
        # batch that selective training attacks still has 2 rows for BatchNorm's last 1x1 feature maps.
        args.image_size = 8
    args.rounds = 3 if args.rounds is None else args.rounds
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu --quick to check the code path")
    for name in ("batch_size", "steps", "rounds", "matmul_size", "pgd_steps", "profile_steps", "image_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup == 0 and args.steps < 2:
        parser.error("--steps must be >= 2 without warm-up steps (the first one starts the clock)")
    if args.profile and args.warmup == 0:
        parser.error("--profile needs --warmup >= 1: the first step (initialization) is not profiled")
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|LeafSpec|val_dataloader).*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no info lines for every fit
    started = time.perf_counter()
    peak = matmul_peak(torch.device(args.device), args.matmul_size)
    rounds: list[dict[str, dict]] = []  # per round: label -> that run's throughput
    with tempfile.TemporaryDirectory() as root:
        for i in range(args.rounds):
            runs: dict[str, dict] = {}
            for label, recipe, p_up in RECIPES:
                plain = plain_label(recipe, p_up) if args.precision in AUTOCAST else None
                pair = [label, plain] if plain else [label]
                for name in pair[::-1] if i % 2 else pair:  # the loop first every other round
                    runs[name] = (run_plain(recipe, p_up, args) if name == plain
                                  else run_recipe(recipe, p_up, args, root))
            rounds.append(runs)
    rows = [{"recipe": label, **median_run([runs[label] for runs in rounds], peak)} for label in rounds[0]]
    overhead = []
    for label, recipe, p_up in RECIPES:
        plain = plain_label(recipe, p_up)
        if plain not in rounds[0]:  # no plain loop for this recipe, or none at this precision
            continue
        ratios = sorted(runs[label]["images_per_s"] / runs[plain]["images_per_s"] for runs in rounds)
        overhead.append({"comparison": f"{label}: module / plain loop, images per second",
                         "measured": statistics.median(ratios), "min": ratios[0], "max": ratios[-1],
                         "rounds": len(ratios), "target": f">= {TARGET_THROUGHPUT}"})
    label = "ResNet-18" if args.model == "resnet18" else args.model
    print(f"network {label}, PGD-{args.pgd_steps}, batch {args.batch_size}, {args.image_size}x{args.image_size} px, "
          f"{args.precision}, channels_last {args.channels_last}, compile {args.compile_mode or args.compile}; "
          f"{machine(args.device)}; "
          f"bf16 matmul peak {peak / 1e12:.1f} TFLOP/s ({args.matmul_size}^2)\n")
    print(f"{args.rounds} round(s) of every recipe, the module and the plain loop in turn; medians over rounds\n")
    print(format_tables(rows, overhead))
    if not overhead:
        print(f"\n(no plain loop under {args.precision}: it would need a GradScaler)")
    with tempfile.TemporaryDirectory() as root:
        profiles = [profile_recipe(label, args, root) for label in args.profile]
    print(f"\nwhole script: {time.perf_counter() - started:.0f} s")
    record = {"machine": machine(args.device), "date": datetime.date.today().isoformat(), "model": args.model,
              "precision": args.precision, "batch_size": args.batch_size,
              "image_size": args.image_size, "channels_last": args.channels_last, "compile": args.compile,
              "compile_mode": args.compile_mode,
              "steps": args.steps, "rounds": args.rounds, "peak_flops": peak, "quick": args.quick, "rows": rows,
              "comparisons": overhead, "profile": profiles}
    if args.json is not None:
        append_json(args.json, record)
    return record


if __name__ == "__main__":
    main()
