"""The training step with its PGD attack compiled into one graph against the eager step and the plain loop, on a GPU.

A ResNet-18 PGD-10 step at batch 256 on an H200 was bound by the host (``gpu_speed.py --profile``: the device busy
about half of a step, some 3,600 kernel launches). ``lightning_advsel.compiled_attack.CompiledPGD`` compiles the
attack (``torch.compile(fullgraph=True, dynamic=False)``, ``mode="reduce-overhead"`` on CUDA: CUDA graphs), one PGD
step replayed ``steps`` times (``--attack-graph step``, the default: a shorter compilation) or the whole loop
(``--attack-graph loop``). Per recipe (robust, selective margin at attack_frac 0.5, ds at p_up 0.5; in this order,
the most telling first) this script trains ``--warmup`` + ``--steps`` batches of random CIFAR-10-shaped images
three ways on one network reset to the same weights: the package's step (``adversarial_step``, backward, SGD)
with the eager attack, the same step with the compiled attack, and for robust and ds the hand-written loop of
``speed.py``; then profiles ``--profile-steps`` more steps of each for the device's busy share and the kernel
launches per step. Before timing it checks that the compiled attack reaches the eager attack's adversarial loss on
the first batch (the GPU machines run a torch release the compiled attack was not tested on).

The step is the package's own, outside a Trainer (the module's ``compile_attack`` passes the same attacker to the
same step); the module's overhead over this step is ``gpu_speed.py``'s module / plain loop comparison. FLOPs per
step are counted once per recipe on the eager step (the compiled one does the same work); compile seconds are those
of the calls that compiled a graph (their one run included).

Targets (ResNet-18, bf16, batch 256, channels-last, H100/H200): selective margin 0.5 at most 0.70x robust's step
time, both compiled; robust compiled at least 1.4x the plain eager loop's images per second; at least 20% of the
measured bf16 dense peak. Each recipe's rows are printed and written to ``--json`` as they finish::

    python benchmarks/compiled_speed.py --json OUT/compiled.json               # CUDA, bf16, CUDA graphs
    python benchmarks/compiled_speed.py --attack-graph loop --json OUT/compiled.json   # the whole loop in a graph
    python benchmarks/compiled_speed.py --device cpu --quick --attack-backend aot_eager   # the code path on CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from gpu_speed import MODELS, matmul_peak, network, random_images, sgd, throughput, train_attack, window
from speed import machine, now, operator_events, plain_step, self_time_key, update
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from lightning_advsel.compiled_attack import GRAPHS, CompiledPGD
from lightning_advsel.objectives import Objective
from lightning_advsel.step import StepSettings, adversarial_step, eager_attack

# (label, recipe, p_up, plain loop runs it); the order is the order of importance for a short GPU session.
RECIPES = [("robust", "robust", 1.0, True), ("selective margin", "selective", 1.0, False),
           ("ds p_up 0.5", "ds", 0.5, True)]
KINDS = ["eager attack", "compiled attack", "plain loop"]
AUTOCAST = {"bf16-mixed": torch.bfloat16, "32-true": None}
TARGET_SELECTIVE = 0.70  # selective margin 0.5 / robust, step time, both compiled: at most
TARGET_OVER_PLAIN = 1.4  # robust compiled / plain eager loop, images per second: at least
TARGET_PEAK_SHARE = 0.20  # robust compiled, share of the bf16 dense peak: at least
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch")


def settings_of(recipe: str, p_up: float, args: argparse.Namespace) -> StepSettings:
    return StepSettings(recipe=recipe, p_up=p_up, attack_frac=0.5, attack_score="margin",
                        train_attack=train_attack(args))


def make_attacker(args: argparse.Namespace) -> CompiledPGD:
    """The compiled attack: CUDA graphs on a GPU (inductor's ``reduce-overhead``), inductor's default on a CPU."""
    mode = "reduce-overhead" if args.device == "cuda" and args.attack_backend == "inductor" else None
    return CompiledPGD(backend=args.attack_backend, mode=mode, graph=args.attack_graph)


def step_fn(kind: str, recipe: str, p_up: float, net: nn.Module, args: argparse.Namespace,
            attacker: CompiledPGD) -> Callable[[int, Tensor, Tensor], None]:
    """One training step of ``kind`` on ``net`` with a fresh SGD optimizer: ``fn(i, x, y)`` for batch ``i``."""
    optimizer, settings, autocast = sgd(net.parameters()), settings_of(recipe, p_up, args), AUTOCAST[args.precision]
    if kind == "plain loop":
        return lambda i, x, y: plain_step(net, optimizer, x, y, recipe, p_up, settings.train_attack, autocast)

    def step(i: int, x: Tensor, y: Tensor) -> None:
        generator = torch.Generator(x.device).manual_seed(i)  # as the module: one seeded generator per step
        with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = adversarial_step(net, x, y, settings, generator,
                                   attacker=attacker if kind == "compiled attack" else None)
        update(optimizer, out.loss)

    return step


def run(kind: str, recipe: str, p_up: float, net: nn.Module, initial: dict[str, Tensor], args: argparse.Namespace,
        attacker: CompiledPGD, step_flops: float) -> dict:
    """``warmup + steps`` steps of ``kind`` from the weights ``initial`` (copied in place, so that a compiled graph
    keeps reading the same memory), timed over the steps after the warm-up, then ``profile_steps`` profiled."""
    net.load_state_dict(initial)
    compiled_before, eager_before = set(attacker.compile_seconds), attacker.eager_calls
    fn, device, marks = step_fn(kind, recipe, p_up, net, args, attacker), torch.device(args.device), []
    at = window(args.warmup, args.steps)
    for i, (x, y) in enumerate(random_images(args)):
        fn(i, x, y)
        if i in at:
            marks.append(now(device))
    row = {"recipe": recipe_label(recipe, p_up), "kind": kind, **throughput(marks, args, step_flops)}
    row["compile_s"] = sum(s for key, s in attacker.compile_seconds.items() if key not in compiled_before)
    row["eager_calls"] = attacker.eager_calls - eager_before  # batches the compiled attack ran eagerly
    return {**row, **profile_steps(fn, args)}


def recipe_label(recipe: str, p_up: float) -> str:
    return next(label for label, r, q, _ in RECIPES if (r, q) == (recipe, p_up))


def profile_steps(fn: Callable[[int, Tensor, Tensor], None], args: argparse.Namespace) -> dict:
    """The share of ``profile_steps`` steps' wall time the device was busy with kernels (CPU: with operators),
    and the kernel launches (a CUDA graph's replay counts one) per step."""
    device = torch.device(args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    batches = list(random_images(args, args.profile_steps))
    with profile(activities=activities) as prof:
        start = now(device)
        for i, (x, y) in enumerate(batches):
            fn(10_000 + i, x, y)
        wall = now(device) - start
    events = operator_events(prof)
    busy = sum(getattr(e, self_time_key(args.device)) for e in events) / 1e6 / wall
    launches = sum(e.count for e in events if e.key in LAUNCHES)
    return {"busy_share": busy, "launches_per_step": launches / args.profile_steps}


def count_flops(recipe: str, p_up: float, net: nn.Module, initial: dict[str, Tensor], args: argparse.Namespace,
                attacker: CompiledPGD) -> float:
    """FLOPs of one eager step of ``recipe`` (``torch.utils.flop_counter``), the weights put back afterwards."""
    fn = step_fn("eager attack", recipe, p_up, net, args, attacker)
    x, y = next(iter(random_images(args, 1)))
    with FlopCounterMode(display=False) as counter:
        fn(0, x, y)
    net.load_state_dict(initial)
    return float(counter.get_total_flops())


def check_attack(net: nn.Module, attacker: CompiledPGD, args: argparse.Namespace) -> dict:
    """The adversarial loss of the compiled and the eager attack on one batch, from the same draws."""
    x, y = next(iter(random_images(args, 1)))
    attack, autocast = train_attack(args), AUTOCAST[args.precision]
    losses = {}
    with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        for name, fn in (("eager", eager_attack), ("compiled", attacker)):
            x_adv = fn(net, x, y, attack, torch.Generator(x.device).manual_seed(0), Objective())
            with torch.no_grad():
                losses[name] = F.cross_entropy(net(x_adv).float(), y).item()
    diff = abs(losses["compiled"] - losses["eager"]) / max(abs(losses["eager"]), 1e-12)
    return {"eager_loss": losses["eager"], "compiled_loss": losses["compiled"], "relative_difference": diff,
            "compile_s": sum(attacker.compile_seconds.values())}


def comparisons(rows: dict[tuple[str, str], dict], peak: float) -> list[dict]:
    """The compiled step against the eager one and the plain loop, and the issue's three targets."""
    out = []
    for label, *_ in RECIPES:
        eager, compiled = rows.get((label, "eager attack")), rows.get((label, "compiled attack"))
        if eager and compiled:
            out.append({"comparison": f"{label}: compiled / eager attack, images per second",
                        "measured": compiled["images_per_s"] / eager["images_per_s"], "target": ""})
    robust, selective = rows.get(("robust", "compiled attack")), rows.get(("selective margin", "compiled attack"))
    plain = rows.get(("robust", "plain loop"))
    if robust and selective:
        out.append({"comparison": "selective margin / robust, step time, both compiled",
                    "measured": selective["ms_per_step"] / robust["ms_per_step"], "target": f"<= {TARGET_SELECTIVE}"})
    if robust and plain:
        out.append({"comparison": "robust compiled / plain eager loop, images per second",
                    "measured": robust["images_per_s"] / plain["images_per_s"], "target": f">= {TARGET_OVER_PLAIN}"})
    if robust:
        out.append({"comparison": "robust compiled, share of the bf16 dense peak",
                    "measured": robust["flops_per_s"] / peak, "target": f">= {TARGET_PEAK_SHARE}"})
    return out


def format_tables(rows: list[dict], compared: list[dict]) -> str:
    lines = ["| recipe | step | images / s | ms / step | device busy | launches / step | compile s | "
             "share of the bf16 peak |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['recipe']} | {r['kind']} | {r['images_per_s']:.0f} | {r['ms_per_step']:.1f} | "
              f"{r['busy_share']:.0%} | {r['launches_per_step']:.0f} | {r['compile_s']:.1f} | "
              f"{r['peak_share']:.1%} |" for r in rows]
    if compared:
        lines += ["", "| comparison | measured | target |", "| --- | ---: | --- |"]
        lines += [f"| {c['comparison']} | {c['measured']:.3f} | {c['target']} |" for c in compared]
    return "\n".join(lines)


def save(path: Path | None, record: dict) -> None:
    """Write ``record`` into the JSON list at ``path``: appended the first time, replaced in place after (the
    same ``started`` time), so that a run stopped part way keeps the recipes it finished."""
    if path is None:
        return
    records = json.loads(path.read_text()) if path.exists() else []
    records = [r for r in records if r.get("started") != record["started"]] + [record]
    path.write_text(json.dumps(records, indent=1))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--model", choices=MODELS, default="resnet18")
    parser.add_argument("--precision", choices=list(AUTOCAST), default="bf16-mixed")
    parser.add_argument("--batch-size", type=int, default=256, help="clean images per batch")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (the compilation among them)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--profile-steps", type=int, default=5, help="profiled steps per row after the timed ones")
    parser.add_argument("--pgd-steps", type=int, default=10, help="steps of the training attack")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--attack-graph", choices=GRAPHS, default="step",
                        help="compile one PGD step replayed --pgd-steps times, or the whole loop")
    parser.add_argument("--attack-backend", default="inductor",
                        help="torch.compile backend of the attack (aot_eager: a CPU check without code generation)")
    parser.add_argument("--recipes", nargs="*", choices=[recipe for _, recipe, *_ in RECIPES],
                        default=[recipe for _, recipe, *_ in RECIPES], metavar="RECIPE",
                        help="the recipes to run, of robust, selective and ds (always in that order)")
    parser.add_argument("--matmul-size", type=int, default=8192, help="side of the bf16 matmul measuring the peak")
    parser.add_argument("--image-size", type=int, default=32, help="pixels per side of the random images")
    parser.add_argument("--json", type=Path, default=None, help="write the results into this JSON list")
    parser.add_argument("--quick", action="store_true",
                        help="batch 4, 8x8 images, PGD-2, 1 + 2 steps, 1 profiled, a small matmul: checks that it runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.warmup, args.steps, args.matmul_size, args.pgd_steps = 4, 1, 2, 256, 2
        args.profile_steps, args.image_size = 1, 8
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu --quick to check the code path")
    for name in ("batch_size", "warmup", "steps", "profile_steps", "pgd_steps", "matmul_size", "image_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|LeafSpec).*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    started = time.perf_counter()
    device = torch.device(args.device)
    peak = matmul_peak(device, args.matmul_size)
    torch.manual_seed(0)
    net = network(args.model).to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    net.train()
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    attacker = make_attacker(args)
    record: dict[str, Any] = {
        "started": datetime.datetime.now().isoformat(), "machine": machine(args.device),
        "date": datetime.date.today().isoformat(), "compiled_attack": True, "model": args.model,
        "precision": args.precision, "batch_size": args.batch_size, "image_size": args.image_size,
        "channels_last": args.channels_last, "pgd_steps": args.pgd_steps, "attack_graph": args.attack_graph,
        "attack_backend": args.attack_backend, "steps": args.steps, "quick": args.quick, "peak_flops": peak,
        "attack_check": check_attack(net, attacker, args), "rows": [], "comparisons": []}
    net.load_state_dict(initial)
    check = record["attack_check"]
    print(f"network {args.model}, PGD-{args.pgd_steps}, batch {args.batch_size}, {args.precision}, channels_last "
          f"{args.channels_last}, attack graph {args.attack_graph} ({args.attack_backend}); {machine(args.device)}; "
          f"bf16 matmul peak {peak / 1e12:.1f} TFLOP/s\n\ncompiled attack check: adversarial loss eager "
          f"{check['eager_loss']:.4f}, compiled {check['compiled_loss']:.4f} (relative difference "
          f"{check['relative_difference']:.1e}; the batch's graph compiled in {check['compile_s']:.1f} s)\n",
          flush=True)
    rows: dict[tuple[str, str], dict] = {}
    for label, recipe, p_up, has_plain in RECIPES:
        if recipe not in args.recipes:
            continue
        flops = count_flops(recipe, p_up, net, initial, args, attacker)
        for kind in KINDS if has_plain else KINDS[:2]:
            row = run(kind, recipe, p_up, net, initial, args, attacker, flops)
            rows[(label, kind)] = {**row, "peak_share": row["flops_per_s"] / peak}
        record["rows"], record["comparisons"] = list(rows.values()), comparisons(rows, peak)
        save(args.json, record)
        print(f"{label} done ({time.perf_counter() - started:.0f} s)", flush=True)
    print("\n" + format_tables(record["rows"], record["comparisons"]))
    print(f"\nwhole script: {time.perf_counter() - started:.0f} s")
    return record


if __name__ == "__main__":
    main()
