"""What the host does in one training step: operators dispatched and waits for the device, module against the
plain loop, per recipe.

On a GPU a ResNet-18 PGD-10 step at batch 256 is limited by its host (``gpu_speed.py --profile``: the device
busy about half of the step, some 3,600 kernel launches per step). Two things then set the step's time: how many
operators the host dispatches (each one or more kernel launches) and how often it waits for the device to
finish what is queued, so that it cannot queue ahead. Both counts are the same on any device, so this script
counts them on the CPU, in seconds:

* operators: every ATen operator dispatched between the start and the end of the training batch
  (``TorchDispatchMode``; views and other operators without a kernel count too);
* host waits: the calls that need a device value on the host (``item``, ``tolist``, ``bool``/``int``/
  ``float`` of a tensor, ``cpu``/``numpy``, ``nonzero``, ``masked_select``, ``unique``, indexing with a
  boolean tensor) or copy Python data onto the device (``torch.tensor``/``as_tensor`` with a ``device``):
  on a GPU each waits for the queued work (torch copies from pageable host memory synchronously). Caught with
  ``TorchFunctionMode``, with the line of the package (or Lightning, torchmetrics) that made each.

The module's step runs under a ``Trainer``, counted from one ``on_train_batch_start`` to the next: its training
step, logging and metrics, and what Lightning does between batches (its loggers' bookkeeping, fetching the next
batch); the plain loop's is ``speed.plain_step`` and the fetch of its next batch. Same network, images, attack and
optimizer; the third step of each is counted (after the first steps' lazy initialization). A second table
counts the module in other settings (:data:`SETTINGS`: the paired objectives, the selective authors' clean rows, the
callbacks that read every step's selection) and a validation batch, which the plain loop does not have. A third
counts the package's step outside a Trainer (``adversarial_step``, backward, SGD) per recipe with the eager attack
and with the attack compiled into one graph (``lightning_advsel.compiled_attack.CompiledPGD``, which the module's
``compile_attack`` passes to the same step). The compiled step is counted as the eager one, after the first steps
compiled its graphs; dynamo compiles nothing under a dispatch mode, so the counters pause during each call of a
compiled graph (``CompiledPGD.graph_context``) and the graph's calls are counted instead: each is one launch when
replayed as a CUDA graph, and none can wait for the device (``fullgraph=True`` refuses the graph break a host read
would be)::

    python benchmarks/host_work.py                   # ResNet-18, PGD-10, robust / ds / selective recipes
    python benchmarks/host_work.py --json host.json  # and append the results
    python benchmarks/host_work.py --tables compiled --attack-backend aot_eager   # the compiled table, no codegen

It times nothing: on a CPU even tiny images leave a ResNet-18 step computing (its 11 million weights' gradients
and update), not dispatching: a step of 8x8 images at batch 8 took about 230 ms on our 2-core machine for some
2,800 operators, for the module and the plain loop alike, so a CPU clock does not isolate the host's share.
"""

from __future__ import annotations

import argparse
import collections
import logging
import tempfile
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from compiled_speed import make_attacker, settings_of
from gpu_speed import RECIPES, make_module, plain_label, recipe_of, sgd, train_attack
from lightning.pytorch.callbacks import Callback
from speed import append_json, machine, make_trainer, plain_step, update
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from lightning_advsel.callbacks import SelectionMakeup, StabilityProfile
from lightning_advsel.compiled_attack import GRAPHS
from lightning_advsel.models import ResNet18
from lightning_advsel.step import adversarial_step

COUNTED_STEP = 2  # the third training step (batch index 2)
# Tensor methods and torch functions that read a device value on the host (``bincount`` on a GPU reads the
# largest value to size its output).
READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
         "masked_select", "unique", "unique_consecutive", "bincount"}
FROM_HOST = {"tensor", "as_tensor"}  # with a device: a copy from the host
# Where a wait is attributed: the innermost frame in one of these (else the innermost frame of all).
SITE_ROOTS = ("lightning_advsel", "lightning/pytorch", "torchmetrics", "benchmarks")


# The module in other settings, counted alone: (label, recipe row of gpu_speed.RECIPES, further module
# arguments, callbacks). p_up 0.75 keeps at least 2 attacked rows of batch 8 in the selected pairs (BatchNorm).
SETTINGS = [
    ("robust, TRADES", "robust", {"objective": "trades"}, ()),
    ("ds p_up 0.5, MART", "ds p_up 0.5", {"objective": "mart"}, ()),
    ("selective margin p_up 0.75, TRADES", "selective margin", {"objective": "trades", "p_up": 0.75}, ()),
    ("selective margin, clean_rows all", "selective margin", {"clean_rows": "all"}, ()),
    ("ds p_up 0.5, SelectionMakeup", "ds p_up 0.5", {}, (SelectionMakeup,)),
    ("robust, StabilityProfile", "robust", {}, (StabilityProfile,)),
]


class Images(L.LightningDataModule):
    """Batches ``(x, y)``, or ``(x, y, index)`` with the attributes :class:`StabilityProfile` reads of a data
    module."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, return_index: bool = False) -> None:
        super().__init__()
        self.data = TensorDataset(x, y, torch.arange(len(y))) if return_index else TensorDataset(x, y)
        self.batch_size, self.return_index, self.index_size = batch_size, return_index, len(y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)


class Operators(TorchDispatchMode):
    """Counts the ATen operators dispatched inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


class HostWaits(TorchFunctionMode):
    """Records the calls inside the block that would make the host wait for a GPU, with the line that made
    each (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self._waits(name, args, kwargs):
            self.sites[f"{name} at {_site()}"] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _waits(name: str, args: tuple, kwargs: dict) -> bool:
        if name in READS:
            return True
        if name in FROM_HOST:
            return kwargs.get("device") is not None and not (args and isinstance(args[0], Tensor))
        if name in ("__getitem__", "__setitem__") and len(args) > 1:  # a boolean mask: nonzero inside
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in index)
        return False


def _site() -> str:
    frames = traceback.extract_stack()[:-2]  # leave out _site and __torch_function__
    for frame in reversed(frames):
        if any(root in frame.filename for root in SITE_ROOTS) and not frame.filename.endswith("host_work.py"):
            return f"{_short(frame.filename)}:{frame.lineno} ({frame.name})"
    return f"{_short(frames[-1].filename)}:{frames[-1].lineno}"


def _short(filename: str) -> str:
    for root in SITE_ROOTS:
        if root in filename:
            return root + filename.split(root, 1)[1]
    return Path(filename).name


class CountStep(Callback):
    """Counts operators and host waits from the start of training (or validation) batch ``COUNTED_STEP`` to the
    start of the next one."""

    def __init__(self) -> None:
        self.ops, self.waits = Operators(), HostWaits()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx == COUNTED_STEP:
            self.waits.__enter__()
            self.ops.__enter__()
        elif batch_idx == COUNTED_STEP + 1:
            self.ops.__exit__(None, None, None)
            self.waits.__exit__(None, None, None)

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self.on_train_batch_start(trainer, pl_module, batch, batch_idx)


def table_row(label: str, ops: Operators, waits: HostWaits) -> dict:
    """A table row: the counts of one step and where its waits are."""
    return {"recipe": label, "operators": ops.count, "host_waits": sum(waits.sites.values()),
            "sites": dict(waits.sites)}


def images(args: argparse.Namespace) -> tuple[Tensor, Tensor]:
    torch.manual_seed(0)
    n = args.batch_size * (COUNTED_STEP + 2)  # the counted step's next batch too
    return torch.rand(n, 3, args.image_size, args.image_size), torch.randint(0, 10, (n,))


def count_module(label: str, args: argparse.Namespace, row: str | None = None, settings: dict | None = None,
                 callbacks: tuple = ()) -> dict:
    """The module's counts for the recipe row ``row`` of gpu_speed.RECIPES (default: ``label``), with further
    module arguments ``settings`` and ``callbacks`` (classes, made with their defaults)."""
    recipe, p_up = recipe_of(row or label)
    settings = {"p_up": p_up} | (settings or {})
    x, y = images(args)
    counter = CountStep()
    with tempfile.TemporaryDirectory() as root:
        extra = [c(path=str(Path(root) / "profile.json")) if c is StabilityProfile else c() for c in callbacks]
        make_trainer("cpu", COUNTED_STEP + 2, [counter, *extra], root, precision=args.precision).fit(
            make_module(recipe, settings.pop("p_up"), args, **settings),
            datamodule=Images(x, y, args.batch_size, return_index=StabilityProfile in callbacks))
    return table_row(label, counter.ops, counter.waits)


def count_validation(args: argparse.Namespace) -> dict:
    """A validation batch of the module under its PGD attack (``train_attack``'s radius and steps, eval mode)."""
    x, y = images(args)
    counter = CountStep()
    module = make_module("robust", 1.0, args)
    module.eval_attack = replace(train_attack(args), mode="eval")
    with tempfile.TemporaryDirectory() as root:
        L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  callbacks=[counter], default_root_dir=root, precision=args.precision).validate(
            module, DataLoader(TensorDataset(x, y), batch_size=args.batch_size), verbose=False)
    return table_row(f"validation batch, PGD-{args.pgd_steps}", counter.ops, counter.waits)


def count_plain(label: str, args: argparse.Namespace) -> dict:
    recipe, p_up = recipe_of(label)
    x, y = images(args)
    torch.manual_seed(0)
    model = ResNet18()
    optimizer, attack = sgd(model.parameters()), train_attack(args)
    model.train()
    autocast = torch.bfloat16 if args.precision == "bf16-mixed" else None
    ops, waits = Operators(), HostWaits()
    batches = iter(DataLoader(TensorDataset(x, y), batch_size=args.batch_size))
    xb, yb = next(batches)
    for i in range(COUNTED_STEP + 1):
        counted = i == COUNTED_STEP  # the step and the fetch of the next batch, as the module's count
        with waits if counted else nullcontext(), ops if counted else nullcontext():
            plain_step(model, optimizer, xb, yb, recipe, p_up, attack, autocast)
            xb, yb = next(batches)
    return table_row(plain_label(recipe, p_up), ops, waits)


@contextmanager
def paused(*modes: Any) -> Iterator[None]:
    """The block without the counting ``modes`` (given in the order they were entered), which resume after it."""
    for mode in reversed(modes):
        mode.__exit__(None, None, None)
    try:
        yield
    finally:
        for mode in modes:
            mode.__enter__()


def count_step(label: str, args: argparse.Namespace, compiled: bool) -> dict:
    """The package's step of the recipe row ``label`` outside a Trainer (``adversarial_step``, backward, SGD, the
    next batch's fetch, as the plain loop's count), with the eager or the compiled attack; the third step counted."""
    recipe, p_up = recipe_of(label)
    x, y = images(args)
    torch.manual_seed(0)
    model = ResNet18().train()
    optimizer, settings, attacker = sgd(model.parameters()), settings_of(recipe, p_up, args), make_attacker(args)
    autocast = args.precision == "bf16-mixed"
    ops, waits = Operators(), HostWaits()
    batches = iter(DataLoader(TensorDataset(x, y), batch_size=args.batch_size))
    xb, yb = next(batches)
    for i in range(COUNTED_STEP + 1):
        counted = i == COUNTED_STEP  # after the steps that compiled the attack's graphs
        calls = attacker.graph_calls
        attacker.graph_context = (lambda: paused(waits, ops)) if counted else nullcontext
        with waits if counted else nullcontext(), ops if counted else nullcontext():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = adversarial_step(model, xb, yb, settings, torch.Generator().manual_seed(i),
                                       attacker=attacker if compiled else None)
            update(optimizer, out.loss)
            xb, yb = next(batches)
    row = table_row(f"{label}, step, {'compiled' if compiled else 'eager'} attack", ops, waits)
    return {**row, "graph_calls": attacker.graph_calls - calls, "eager_calls": attacker.eager_calls}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true")
    parser.add_argument("--batch-size", type=int, default=8, help="clean images per batch (counts do not grow "
                        "with it; selective recipes need >= 4 so that their half keeps 2 rows per BatchNorm)")
    parser.add_argument("--image-size", type=int, default=8, help="pixels per side (counts do not grow with it)")
    parser.add_argument("--pgd-steps", type=int, default=10, help="steps of the training attack")
    parser.add_argument("--tables", choices=["all", "both", "recipes", "settings", "compiled"], default="all",
                        help="count the recipes against the plain loop, the module's other settings, both, the "
                        "package's step with the eager and the compiled attack, or all three")
    parser.add_argument("--attack-backend", default="inductor",
                        help="the compiled table's torch.compile backend (aot_eager: no code generation)")
    parser.add_argument("--attack-graph", choices=GRAPHS, default="step",
                        help="the compiled table: one PGD step replayed, or the whole loop, as the graph")
    parser.add_argument("--step-recipes", nargs="*", choices=[label for label, _, _ in RECIPES],
                        default=[label for label, _, _ in RECIPES], metavar="RECIPE",
                        help="the compiled table's recipe rows (default: all of them)")
    parser.add_argument("--json", type=Path, default=None, help="append the results to this JSON list")
    args = parser.parse_args(argv)
    for name in ("batch_size", "image_size", "pgd_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch_size < 4:
        parser.error(f"--batch-size must be >= 4 (selective recipes attack half of it), got {args.batch_size}")
    args.channels_last, args.compile, args.device = False, False, "cpu"  # what gpu_speed and compiled_speed read
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|LeafSpec|val_dataloader).*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    rows, others, steps = [], [], []
    for label, _, _ in RECIPES if args.tables in ("all", "both", "recipes") else []:
        rows.append(count_module(label, args))
        if plain_label(*recipe_of(label)):  # the recipes gpu_speed.py also runs as the plain loop
            rows.append(count_plain(label, args))
    if args.tables in ("all", "both", "settings"):
        others = [count_module(label, args, row, settings, callbacks) for label, row, settings, callbacks in SETTINGS]
        others.append(count_validation(args))
    if args.tables in ("all", "compiled"):
        steps = [count_step(label, args, compiled) for label in args.step_recipes for compiled in (False, True)]
    print(f"ResNet-18, PGD-{args.pgd_steps}, {args.precision}, one training step; {machine('cpu')}\n")
    for title, table in (("recipe", rows), ("other setting (module only)", others)):
        if not table:
            continue
        print(f"| {title} | operators / step | host waits / step |\n| --- | ---: | ---: |")
        for r in table:
            print(f"| {r['recipe']} | {r['operators']} | {r['host_waits']} |")
        print()
    if steps:
        print(f"| package step (no Trainer; attack graph: {args.attack_graph}, {args.attack_backend}) | operators / "
              f"step, outside a compiled graph | compiled graph calls / step | host waits / step |\n"
              f"| --- | ---: | ---: | ---: |")
        for r in steps:
            print(f"| {r['recipe']} | {r['operators']} | {r['graph_calls']} | {r['host_waits']} |")
        print()
    print("Where the waits are:\n")
    for r in rows + others + steps:
        for site, n in sorted(r["sites"].items()):
            print(f"- {r['recipe']}: {n} x {site}")
    record = {"machine": machine("cpu"), "precision": args.precision, "pgd_steps": args.pgd_steps,
              "batch_size": args.batch_size, "image_size": args.image_size, "rows": rows, "settings": others,
              "steps": steps, "attack_graph": args.attack_graph, "attack_backend": args.attack_backend}
    if args.json is not None:
        append_json(args.json, record)
    return record


if __name__ == "__main__":
    main()
