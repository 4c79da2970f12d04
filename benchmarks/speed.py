"""The module against a hand-written loop, and the saving the FLOP floor allows: time per epoch and peak memory.

Variants, each one epoch of ``--batches`` training batches from a freshly seeded model (same data order, batch,
PGD and optimizer):

* ``robust`` and ``ds`` (p_up 0.5) as a minimal plain PyTorch loop written below, and as
  :class:`~lightning_advsel.AdversarialSelectionModule` under a ``Trainer`` (target: module epoch <= 1.02 x
  the loop's);
* the module's ``ds`` at p_up 1 and ``selective`` margin at attack_frac 0.5, whose time ratios to ``ds`` and
  ``robust`` are set against the FLOP floor of ``flops_per_step.analytic_units``.

Every repeat runs all variants in turn (in reverse order every other repeat), so a drift of the machine's
speed touches all of them alike; the table shows the median and the spread (min to max). A comparison of two
variants is the median of their per-repeat ratios (epochs a few seconds apart), with those ratios' spread: a
drift slower than a repeat cancels in each ratio, where a ratio of medians would keep it. A module epoch is
timed by a callback from epoch start to epoch end; the Trainer's construction, fit setup and teardown, which
the loop does not have, are the separate "outside" column. Peak memory comes from one more, untimed epoch per
variant, after one warm-up batch: ``torch.cuda.max_memory_allocated`` above the start on GPU; on CPU the peak
of the bytes held by live tensor storages made inside the epoch (:class:`LiveTensorBytes`, counted at every
operator; the allocator's own overhead aside), which does not depend on what ran before in the process. The
process's resident set is no measure here: on our machine the same variant's RSS peak varied by half from one
fresh process to the next.

CPU on MNIST (torchvision layout under ``--data-dir``), the MNIST config's network and PGD-40 at eps 0.3::

    python benchmarks/speed.py --data-dir /path/to/data                     # on an idle machine
    python benchmarks/speed.py --data-dir /path/to/data --json speed.json   # and append the results
    python benchmarks/speed.py --data digits --quick                        # a check that it runs, numbers meaningless
    python benchmarks/speed.py --data-dir /path/to/data --profile           # where a step's time goes

``--step-pairs N`` times steps instead of epochs: for ds p_up 0.5 against ds p_up 1, selective against robust,
the package's robust step against the hand-written one, and ds p_up 1 against itself (the control, which shows
how finely the machine resolves a ratio), N batches each trained by both recipes back to back, each recipe
with its own network; the median of the per-batch time ratios and their quartiles. Steps a second apart share
the machine's speed far better than epochs do.

``--profile`` runs a few steps of each module recipe under ``torch.profiler`` and prints the top of the profile
and the split of a step into attack, scoring, update (training forward, backward, optimizer) and framework (the
rest of the batch: Lightning's hooks, logging, metrics, checks), read from the step's ``record_function`` ranges
(``lightning_advsel.step.PHASES``). On a GPU the ranges measure the host's time: run with
``CUDA_LAUNCH_BLOCKING=1`` for a split of device time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import statistics
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from flops_per_step import analytic_units
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lightning_advsel import AdversarialSelectionModule, AttackConfig
from lightning_advsel.compiled_attack import GRAPHS, CompiledPGD
from lightning_advsel.data import DigitsDataModule, MNISTDataModule
from lightning_advsel.models import SmallCNN
from lightning_advsel.step import PHASES, StepSettings, adversarial_step

TARGET_OVERHEAD = 1.02  # module epoch / plain loop epoch, robust and ds


@dataclass(frozen=True)
class Variant:
    """One row: a recipe run by the plain loop (``plain``) or by the module under a Trainer."""

    label: str
    recipe: str
    p_up: float
    plain: bool = False


VARIANTS = [
    Variant("robust, plain loop", "robust", 1.0, plain=True),
    Variant("robust, module", "robust", 1.0),
    Variant("ds p_up 0.5, plain loop", "ds", 0.5, plain=True),
    Variant("ds p_up 0.5, module", "ds", 0.5),
    Variant("ds p_up 1, module", "ds", 1.0),
    Variant("selective margin 0.5, module", "selective", 1.0),
]


@dataclass(frozen=True)
class Setup:
    """The data set, network and attack of a run (the data set's config: ``configs/<data>/base.yaml``)."""

    make_data: Callable[[], L.LightningDataModule]
    make_model: Callable[[], nn.Module]
    attack: AttackConfig
    lr: float


def setup_for(data: str, data_dir: str | None, batch_size: int | None, steps: int | None) -> Setup:
    """MNIST (the MNIST config: SmallCNN 32/1024, PGD-40 at eps 0.3, Adam 1e-4, batch 100) or digits."""
    if data == "mnist":
        if data_dir is None:
            raise SystemExit("--data mnist needs --data-dir, the folder holding MNIST/raw (torchvision layout)")
        return Setup(
            make_data=partial(MNISTDataModule, data_dir=data_dir, batch_size=batch_size or 100),
            make_model=partial(SmallCNN, input_size=28, hidden=1024, mean=(0.1307,), std=(0.3081,)),
            attack=AttackConfig(eps=0.3, alpha=0.01, steps=steps or 40, mode="train"), lr=1e-4)
    return Setup(make_data=partial(DigitsDataModule, batch_size=batch_size or 64),
                 make_model=partial(SmallCNN, mean=(0.3,), std=(0.4,)),
                 attack=AttackConfig(eps=0.1, alpha=0.025, steps=steps or 10, mode="train"), lr=0.002)


# ------------------------------------------------------------------------------------------- plain loop
def plain_pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int) -> Tensor:
    """L-inf PGD from a uniform start, by hand, in the network's train mode. SmallCNN has no BatchNorm; with one
    (ResNet-18 in ``gpu_speed.py``) each attack step also updates the running statistics, as most hand-written
    loops do, where the module leaves them to the training forward: no difference in the work done."""
    delta = (x + (2 * torch.rand_like(x) - 1) * eps).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x + delta), y, reduction="sum"), delta)
        delta = (x + (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)).clamp(0, 1) - x
    return (x + delta).detach()


def plain_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, recipe: str, p_up: float,
               attack: AttackConfig, autocast: torch.dtype | None = None) -> None:
    """One step of robust or ds training as a user would write it without the package (forwards under
    ``torch.autocast`` in ``autocast`` when given, as Lightning's ``bf16-mixed`` runs a training step)."""
    with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        x_adv = plain_pgd(model, x, y, attack.eps, attack.alpha, attack.steps)
        if recipe == "robust":
            loss = F.cross_entropy(model(x_adv), y)
        else:  # ds: the clean batch and its adversarial rows, the top p_up by cross-entropy backpropagated
            pool_x, pool_y = torch.cat([x, x_adv]), torch.cat([y, y])
            with torch.no_grad():
                scores = F.cross_entropy(model(pool_x), pool_y, reduction="none")
            keep = scores.topk(int(p_up * len(pool_y) + 0.5)).indices
            loss = F.cross_entropy(model(pool_x[keep]), pool_y[keep])
    update(optimizer, loss)


def update(optimizer: torch.optim.Optimizer, loss: Tensor) -> None:
    """The end of every step timed here, the module's and the loop's alike: backward and optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def plain_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any, variant: Variant,
                attack: AttackConfig, batches: int, device: torch.device) -> None:
    """One epoch of robust or ds training by :func:`plain_step`."""
    model.train()
    for i, (x, y) in enumerate(loader):
        if i == batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        plain_step(model, optimizer, x, y, variant.recipe, variant.p_up, attack)


# ------------------------------------------------------------------------------------------------ module
class EpochTimer(Callback):
    """Seconds from the start of the training epoch to its end (after a device sync on GPU)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = now(trainer.strategy.root_device)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = now(trainer.strategy.root_device) - self._start


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def make_module(setup: Setup, variant: Variant, **options: Any) -> AdversarialSelectionModule:
    return AdversarialSelectionModule(
        setup.make_model(), recipe=variant.recipe, p_up=variant.p_up, attack_frac=0.5, attack_score="margin",
        train_attack=setup.attack, eval_attack=None, optimizer=partial(torch.optim.Adam, lr=setup.lr), **options)


def make_trainer(device: str, batches: int, callbacks: list[Callback], root: str, **options: Any) -> L.Trainer:
    return L.Trainer(max_epochs=1, limit_train_batches=batches, limit_val_batches=0, num_sanity_val_steps=0,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     accelerator=device, devices=1, callbacks=callbacks, default_root_dir=root, **options)


def run_once(setup: Setup, data: L.LightningDataModule, variant: Variant, batches: int, device: str,
             seed: int) -> tuple[float, float]:
    """One epoch of ``variant``: (seconds of the epoch, seconds outside it: Trainer construction and fit setup)."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    start = now(dev)
    if variant.plain:
        model = setup.make_model().to(dev)
        optimizer = torch.optim.Adam(model.parameters(), lr=setup.lr)
        plain_epoch(model, optimizer, data.train_dataloader(), variant, setup.attack, batches, dev)
        return now(dev) - start, 0.0
    timer = EpochTimer()
    module = make_module(setup, variant)
    with tempfile.TemporaryDirectory() as root:
        make_trainer(device, batches, [timer], root).fit(module, datamodule=data)
    return timer.seconds, now(dev) - start - timer.seconds


# ------------------------------------------------------------------------------------------------ memory
class LiveTensorBytes(TorchDispatchMode):
    """Inside the block: the bytes of the tensor storages that operators made and that are still alive, and their
    peak. Every operator's outputs are counted once per storage; an output on one of the operator's input
    storages (a view, an in-place result) adds nothing, so views of tensors made before the block (a data set's
    rows) do not count. A storage leaves the count when the last reference to it goes."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs))
                  if isinstance(t, Tensor) and t.layout == torch.strided}
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.layout == torch.strided:
                storage = t.untyped_storage()
                key = storage._cdata  # the C++ storage: shared by views
                if key not in self._sizes and key not in inputs:
                    self._sizes[key] = storage.nbytes()
                    self.live += self._sizes[key]
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float | None]]:
    """``{"mib": ...}``: the peak memory of the block above its start."""
    out: dict[str, float | None] = {"mib": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out["mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    with LiveTensorBytes() as counter:
        yield out
    out["mib"] = counter.peak / 2**20


def measure_memory(setup: Setup, data: L.LightningDataModule, variant: Variant, batches: int, device: str,
                   seed: int) -> float | None:
    """Peak memory of one epoch of ``variant``, in this process, after one warm-up batch."""
    run_once(setup, data, variant, 1, device, seed)
    with peak_memory(torch.device(device)) as peak:
        run_once(setup, data, variant, batches, device, seed)
    return peak["mib"]


# ------------------------------------------------------------------------------------------------ report
def summarize(runs: dict[str, list[tuple[float, float]]], memory: dict[str, float | None]) -> list[dict]:
    rows = []
    for label, values in runs.items():
        epochs = [epoch for epoch, _ in values]
        rows.append({"variant": label, "runs": len(epochs), "median_s": statistics.median(epochs),
                     "min_s": min(epochs), "max_s": max(epochs),
                     "outside_s": statistics.median(outside for _, outside in values),
                     "peak_mib": memory.get(label)})
    return rows


def paired(runs: dict[str, list[tuple[float, float]]], a: str, b: str) -> dict:
    """Epoch time of ``a`` over ``b``, repeat by repeat: the median ratio and the ratios' spread."""
    ratios = [ea / eb for (ea, _), (eb, _) in zip(runs[a], runs[b], strict=True)]
    return {"measured": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def floor_units(recipe: str, p_up: float, steps: int) -> float:
    """The FLOP floor of a step of ``recipe`` (margin score, cross-entropy, PGD-``steps``), in forward units."""
    return analytic_units(recipe, p_up, "margin", "ce", steps)


def comparisons(runs: dict[str, list[tuple[float, float]]], rows: list[dict], steps: int) -> list[dict]:
    """The ratios the targets are about: module over plain loop, and time ratios against the FLOP floor."""
    peak = {r["variant"]: r["peak_mib"] for r in rows}
    floor = partial(floor_units, steps=steps)
    out = []
    for recipe in ("robust", "ds p_up 0.5"):
        out.append({"comparison": f"{recipe}: module / plain loop",
                    **paired(runs, f"{recipe}, module", f"{recipe}, plain loop"), "target": f"<= {TARGET_OVERHEAD}"})
    out.append({"comparison": "ds p_up 0.5 / ds p_up 1 (module)", **paired(runs, "ds p_up 0.5, module",
                                                                         "ds p_up 1, module"),
                "target": f"FLOP floor {floor('ds', 0.5) / floor('ds', 1.0):.3f}"})
    out.append({"comparison": "selective margin 0.5 / robust (module)",
                **paired(runs, "selective margin 0.5, module", "robust, module"),
                "target": f"FLOP floor {floor('selective', 1.0) / floor('robust', 1.0):.3f}"})
    if peak["ds p_up 0.5, module"] is not None and peak["ds p_up 1, module"]:
        ratio = peak["ds p_up 0.5, module"] / peak["ds p_up 1, module"]
        out.append({"comparison": "peak memory: ds p_up 0.5 / ds p_up 1 (selected rows' backward / whole pool's)",
                    "measured": ratio, "min": None, "max": None, "target": "< 1"})
    return out


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    text = f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, lightning {L.__version__}"
    if device == "cuda":
        text += f", {torch.cuda.get_device_name()}"
    return text


def format_tables(rows: list[dict], ratios: list[dict]) -> str:
    def mib(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.0f}"

    lines = ["| variant | epochs timed | median s / epoch | spread (min - max) | outside the epoch, s | peak MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['variant']} | {r['runs']} | {r['median_s']:.3f} | {r['min_s']:.3f} - {r['max_s']:.3f} | "
              f"{r['outside_s']:.3f} | {mib(r['peak_mib'])} |" for r in rows]
    def spread(c: dict) -> str:
        return "one measurement" if c["min"] is None else f"{c['min']:.3f} - {c['max']:.3f}"

    lines += ["", "| comparison | measured (median of per-repeat ratios) | spread (min - max) | target |",
              "| --- | ---: | ---: | --- |"]
    lines += [f"| {c['comparison']} | {c['measured']:.3f} | {spread(c)} | {c['target']} |" for c in ratios]
    return "\n".join(lines)


def append_json(path: Path, record: dict) -> None:
    """Append ``record`` to the JSON list in ``path`` (a new file holds a list of one)."""
    records = json.loads(path.read_text()) if path.exists() else []
    records.append(record)
    path.write_text(json.dumps(records, indent=1))


# -------------------------------------------------------------------------------------------- step pairs
@dataclass(frozen=True)
class StepPair:
    """Two recipes whose steps alternate on the same batches; a recipe is ``StepSettings`` keywords, or
    ``{"plain": recipe}`` for the hand-written loop's step (:func:`plain_step`)."""

    a: str
    b: str
    a_recipe: dict[str, Any]
    b_recipe: dict[str, Any]


STEP_PAIRS = [
    StepPair("ds p_up 0.5", "ds p_up 1", {"recipe": "ds", "p_up": 0.5}, {"recipe": "ds", "p_up": 1.0}),
    StepPair("selective margin 0.5", "robust", {"recipe": "selective", "p_up": 1.0},
             {"recipe": "robust", "p_up": 1.0}),
    # The package's step (adversarial_step, backward, optimizer) against the hand-written one: the Trainer's own
    # share of a step is the profile's "framework" column.
    StepPair("robust, package step", "robust, plain step", {"recipe": "robust", "p_up": 1.0}, {"plain": "robust"}),
    # The control: one recipe against itself shows how finely this machine resolves a ratio.
    StepPair("ds p_up 1", "ds p_up 1 (again)", {"recipe": "ds", "p_up": 1.0}, {"recipe": "ds", "p_up": 1.0}),
]
# ``--compile-attack``: each recipe's step with its attack compiled into one graph
# (lightning_advsel.compiled_attack.CompiledPGD) against the same step with the eager attack.
COMPILED_PAIRS = [
    StepPair(f"{label}, compiled attack", f"{label}, eager attack", {**recipe, "compiled": True}, recipe)
    for label, recipe in (("robust", {"recipe": "robust", "p_up": 1.0}), ("ds p_up 0.5", {"recipe": "ds", "p_up": 0.5}),
                          ("selective margin 0.5", {"recipe": "selective", "p_up": 1.0}))
]


def timed_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
               settings: StepSettings | str, seed: int, device: torch.device, attack: AttackConfig,
               attacker: CompiledPGD | None = None) -> float:
    """Seconds of one training step: as the module runs it (the step's data path, backward, optimizer step) for
    ``StepSettings``, with the compiled ``attacker`` when given, or the hand-written loop's step of the recipe
    named by a string."""
    start = now(device)
    if isinstance(settings, str):
        plain_step(model, optimizer, x, y, settings, 1.0, attack)
        return now(device) - start
    generator = torch.Generator(device).manual_seed(seed)
    update(optimizer, adversarial_step(model, x, y, settings, generator, attacker=attacker).loss)
    return now(device) - start


def recipe_of(settings: StepSettings | str) -> tuple[str, float]:
    """(recipe, p_up) of a step pair's side: ``StepSettings`` or the plain loop's recipe name (p_up 1)."""
    return (settings, 1.0) if isinstance(settings, str) else (settings.recipe, settings.p_up)


def run_step_pairs(setup: Setup, data: L.LightningDataModule, steps: int, warmup: int, device: str,
                   seed: int, pairs: list[StepPair] = STEP_PAIRS,
                   compiler: Callable[[], CompiledPGD] | None = None) -> list[dict]:
    """For each pair, ``warmup`` + ``steps`` batches, each trained by both recipes back to back (in turn first),
    each recipe with its own network from the same initialization: the median of the per-batch time ratios. A side
    with ``"compiled": True`` attacks with a ``compiler()`` of its own, whose compilation falls in the warm-up; its
    seconds are the row's ``compile_s``.

    Steps a second apart share the machine's speed far better than epochs do, so this resolves the step's own
    saving (what :func:`~lightning_advsel.step.adversarial_step` and the update do) more finely than the epoch
    table; Lightning's share of an epoch is the separate module / plain loop comparison.
    """
    dev = torch.device(device)
    out = []
    for pair in pairs:
        trained = []
        for options in (pair.a_recipe, pair.b_recipe):
            torch.manual_seed(seed)
            model = setup.make_model().to(dev).train()
            options = dict(options)
            attacker = compiler() if options.pop("compiled", False) and compiler is not None else None
            settings = options["plain"] if "plain" in options else StepSettings(
                attack_frac=0.5, attack_score="margin", train_attack=setup.attack, **options)
            trained.append((model, torch.optim.Adam(model.parameters(), lr=setup.lr), settings, attacker))
        times: list[list[float]] = [[], []]
        batches = iter(cycle_loader(data))
        for i in range(warmup + steps):
            x, y = (t.to(dev) for t in next(batches))
            for j in ((0, 1) if i % 2 == 0 else (1, 0)):
                model, optimizer, settings, attacker = trained[j]
                seconds = timed_step(model, optimizer, x, y, settings, seed + i, dev, setup.attack, attacker)
                if i >= warmup:
                    times[j].append(seconds)
        ratios = [a / b for a, b in zip(*times, strict=True)]
        quartiles = statistics.quantiles(ratios, n=4)
        floor = floor_units(*recipe_of(trained[0][2]), setup.attack.steps) / floor_units(
            *recipe_of(trained[1][2]), setup.attack.steps)
        out.append({"comparison": f"{pair.a} / {pair.b} (step)", "steps": steps,
                    "a_median_ms": 1000 * statistics.median(times[0]),
                    "b_median_ms": 1000 * statistics.median(times[1]), "measured": statistics.median(ratios),
                    "q1": quartiles[0], "q3": quartiles[2], "min": min(ratios), "max": max(ratios),
                    "floor": floor, **compiled_counts(trained)})
    return out


def compiled_counts(trained: list[tuple]) -> dict:
    """A pair's compiled side: its graphs' compile seconds and the batches it ran eagerly (none, if it worked)."""
    attackers = [side[3] for side in trained if side[3] is not None]
    if not attackers:
        return {}
    return {"compile_s": sum(sum(a.compile_seconds.values()) for a in attackers),
            "graphs": sum(a.compilations for a in attackers), "eager_calls": sum(a.eager_calls for a in attackers)}


def cycle_loader(data: L.LightningDataModule) -> Iterator[tuple[Tensor, Tensor]]:
    """The training batches, epoch after epoch."""
    while True:
        yield from data.train_dataloader()


def format_step_pairs(rows: list[dict]) -> str:
    """The step pairs as markdown; with a compiled attack, its compile seconds in a last column."""
    compiled = any("compile_s" in r for r in rows)
    lines = ["| comparison | steps | a, ms / step | b, ms / step | median ratio | quartiles | spread (min - max) "
             "| FLOP floor |" + (" compile s |" if compiled else ""),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if compiled else "")]
    lines += [f"| {r['comparison']} | {r['steps']} | {r['a_median_ms']:.1f} | {r['b_median_ms']:.1f} | "
              f"{r['measured']:.3f} | {r['q1']:.3f} - {r['q3']:.3f} | {r['min']:.3f} - {r['max']:.3f} | "
              f"{r['floor']:.3f} |" + (f" {r.get('compile_s', 0.0):.1f} |" if compiled else "") for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- profile
PHASE_GROUPS = {
    "attack": [PHASES["attack"]],
    "scoring": [PHASES["score_batch"], PHASES["score_pool"]],
    "update": [PHASES["loss"], "advsel/backward", "advsel/optimizer"],
}


class ProfileSteps(Callback):
    """Profile every training batch from ``start`` on (by default after the first: lazy initialization, the model
    check), each in a range."""

    def __init__(self, activities: list[ProfilerActivity], start: int = 1) -> None:
        self.prof = profile(activities=activities)
        self.start = start
        self._range: record_function | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx == self.start:
            self.prof.__enter__()
        if batch_idx >= self.start:
            self._range = record_function("advsel/batch")
            self._range.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.prof.__exit__(None, None, None)


def with_range(name: str, fn: Callable) -> Callable:
    def ranged(*args: Any, **kwargs: Any) -> Any:
        with record_function(name):
            return fn(*args, **kwargs)
    return ranged


def profile_recipe(setup: Setup, data: L.LightningDataModule, variant: Variant, batches: int,
                   device: str) -> tuple[dict[str, float], profile]:
    """Milliseconds per step of each phase, and the profiler, over ``batches`` steps after a first one."""
    module = make_module(setup, variant)
    module.manual_backward = with_range("advsel/backward", module.manual_backward)
    original = module.configure_optimizers

    def ranged_optimizers() -> Any:
        configured = original()
        optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
        optimizer.step = with_range("advsel/optimizer", optimizer.step)
        return configured

    module.configure_optimizers = ranged_optimizers
    steps = ProfileSteps([ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else []))
    with tempfile.TemporaryDirectory() as root:
        make_trainer(device, batches + 1, [steps], root).fit(module, datamodule=data)
    totals = {event.key: event.cpu_time_total / 1000 / batches for event in steps.prof.key_averages()}
    split = {group: sum(totals.get(name, 0.0) for name in names) for group, names in PHASE_GROUPS.items()}
    split["framework"] = totals.get("advsel/batch", 0.0) - sum(split.values())
    split["batch"] = totals.get("advsel/batch", 0.0)
    return split, steps.prof


def self_time_key(device: str) -> str:
    """The profiler's column of an operator's own time: device time on a GPU, CPU time on a CPU."""
    return "self_device_time_total" if device == "cuda" else "self_cpu_time_total"


def operator_events(prof: profile) -> list[Any]:
    """The profile's operators, the script's and the step's own ``record_function`` ranges aside."""
    return [e for e in prof.key_averages() if not e.key.startswith("advsel/")]


def top_operators(prof: profile, device: str, batches: int, top: int) -> list[dict]:
    """The ``top`` operators by self time (device time on a GPU), in ms per step and share of the step's total."""
    attr = self_time_key(device)
    events = operator_events(prof)
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [{"operator": e.key, "ms_per_step": getattr(e, attr) / 1000 / batches, "share": getattr(e, attr) / total}
            for e in events[:top]]


def run_profile(setup: Setup, data: L.LightningDataModule, batches: int, device: str, top: int) -> list[dict]:
    rows = []
    for variant in (v for v in VARIANTS if not v.plain):
        split, prof = profile_recipe(setup, data, variant, batches, device)
        print(f"\n## {variant.label}: top {top} operators by self time\n")
        print(prof.key_averages().table(sort_by=self_time_key(device), row_limit=top))
        rows.append({"variant": variant.label, **split, "top": top_operators(prof, device, batches, top)})
    print(format_profile(rows))
    return rows


def format_profile(rows: list[dict]) -> str:
    """The split of a step into phases, per recipe, as a markdown table."""
    lines = ["| recipe | ms / step | attack | scoring | update | framework |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        cells = " | ".join(f"{r[p]:.1f} ({r[p] / r['batch']:.0%})" if r["batch"] else "-"
                           for p in ("attack", "scoring", "update", "framework"))
        lines.append(f"| {r['variant']} | {r['batch']:.1f} | {cells} |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=["mnist", "digits"], default="mnist")
    parser.add_argument("--data-dir", default=None, help="folder holding MNIST/raw (torchvision layout)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batches", type=int, default=10, help="training batches per timed epoch")
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs per variant first")
    parser.add_argument("--memory-batches", type=int, default=3, help="training batches of the memory epoch")
    parser.add_argument("--steps", type=int, default=None, help="PGD steps (default: the data set's config)")
    parser.add_argument("--batch-size", type=int, default=None, help="clean samples per batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="append the results to this JSON list")
    parser.add_argument("--quick", action="store_true", help="2 batches, PGD-2, one repeat: checks that it runs")
    parser.add_argument("--profile", action="store_true", help="profile the module's recipes instead of timing")
    parser.add_argument("--top", type=int, default=15, help="--profile: operators shown per recipe")
    parser.add_argument("--step-pairs", type=int, default=0, metavar="N",
                        help="instead of epochs: N batches per pair of recipes, their steps back to back")
    parser.add_argument("--compile-attack", action="store_true",
                        help="with --step-pairs: each recipe's step with the attack compiled into one graph against "
                        "the eager step, and the compile seconds")
    parser.add_argument("--attack-graph", choices=GRAPHS, default="step",
                        help="--compile-attack: one PGD step replayed, or the whole loop, as the graph")
    parser.add_argument("--attack-backend", default="inductor",
                        help="--compile-attack: torch.compile's backend (aot_eager: a check without code generation)")
    parser.add_argument("--memory-of", choices=[v.label for v in VARIANTS], metavar="VARIANT",
                        help="only the peak memory of this variant (one JSON line)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.repeats, args.memory_batches = 2, 1, 1
        args.warmup = 1 if args.compile_attack else 0  # the compiled attack compiles in an untimed step
        args.steps = args.steps or 2
    for name in ("batches", "repeats", "memory_batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.step_pairs and args.step_pairs < 2:  # quartiles need two ratios
        parser.error(f"--step-pairs must be >= 2, got {args.step_pairs}")
    if args.compile_attack and (not args.step_pairs or args.warmup < 1):
        parser.error("--compile-attack times steps: give --step-pairs N and --warmup >= 1 (the compilation's step)")
    setup = setup_for(args.data, args.data_dir, args.batch_size, args.steps)
    data = setup.make_data()
    data.setup("fit")
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|LeafSpec|val_dataloader).*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no info lines for every fit
    if args.memory_of:  # one variant's memory column, alone
        variant = next(v for v in VARIANTS if v.label == args.memory_of)
        mib = measure_memory(setup, data, variant, args.memory_batches, args.device, args.seed)
        print(json.dumps({"mib": mib}))
        return {"mib": mib}
    print(f"{args.data}, batch {data.batch_size}, {setup.attack.describe()}, {args.batches} batches per epoch; "
          f"device: {machine(args.device)}")
    described = {"machine": machine(args.device), "date": datetime.date.today().isoformat(), "data": args.data,
                 "batch_size": data.batch_size, "attack": setup.attack.describe(), "quick": args.quick}
    if args.profile or args.step_pairs:
        if args.profile:
            record = {**described, "batches": args.batches,
                      "profile": run_profile(setup, data, args.batches, args.device, args.top)}
        else:
            compiled = {}
            if args.compile_attack:
                compiled = {"pairs": COMPILED_PAIRS, "compiler": partial(
                    CompiledPGD, backend=args.attack_backend, graph=args.attack_graph)}
                described |= {"attack_graph": args.attack_graph, "attack_backend": args.attack_backend}
            pairs = run_step_pairs(setup, data, args.step_pairs, args.warmup, args.device, args.seed, **compiled)
            print(format_step_pairs(pairs))
            record = {**described, "warmup": args.warmup, "step_pairs": pairs}
        if args.json is not None:
            append_json(args.json, record)
        return record
    for variant in VARIANTS:
        for _ in range(args.warmup):
            run_once(setup, data, variant, args.batches, args.device, args.seed)
    runs: dict[str, list[tuple[float, float]]] = {v.label: [] for v in VARIANTS}
    for repeat in range(args.repeats):
        for variant in VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]:
            runs[variant.label].append(run_once(setup, data, variant, args.batches, args.device, args.seed))
    # In this process: the count sees only storages made inside the measured epoch, so a variant measured after
    # the others reads what it reads alone (`--memory-of`; the six MNIST rows of SPEED.md agree to the byte).
    memory = {v.label: measure_memory(setup, data, v, args.memory_batches, args.device, args.seed)
              for v in VARIANTS}
    rows = summarize(runs, memory)
    ratios = comparisons(runs, rows, setup.attack.steps)
    print(format_tables(rows, ratios))
    record = {**described, "batches": args.batches, "repeats": args.repeats, "rows": rows,
              "comparisons": ratios}
    if args.json is not None:
        append_json(args.json, record)
    return record


if __name__ == "__main__":
    main()
