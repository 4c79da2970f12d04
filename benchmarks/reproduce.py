"""The recipe matrix on real data: one JSON record per run, resumable, and a report built from the records.

Every run goes through the product's command line (:func:`lightning_advsel.cli.build_cli`, what
``lightning-advsel`` calls): ``fit`` with a shipped recipe config plus the suite's overrides, then ``test`` on
the suite's fixed test images with PGD-20 and with AutoAttack. Each run happens in a child process and writes
``<records>/<suite>/<run>.json`` when it has finished; a rerun skips the runs whose record exists, so the matrix
can be filled over several sittings.

    python benchmarks/reproduce.py run mnist --data-dir /path/to/data          # the whole MNIST matrix
    python benchmarks/reproduce.py run mnist --data-dir ... --only robust ds   # some rows
    python benchmarks/reproduce.py run mnist --data-dir ... --seeds 0          # every row once
    python benchmarks/reproduce.py list mnist                                  # what the matrix holds
    python benchmarks/reproduce.py run cifar10_gpu --data-dir ... --model wrn34_10   # another network
    python benchmarks/reproduce.py figures mnist ds-s0 --data-dir ...         # refit one run for its figures
    python benchmarks/reproduce.py report                                      # RESULTS.md and figures

A record holds the fully resolved config of the fit (the ``config.yaml`` the CLI writes), the seed, the
commit, the machine, the FLOPs of the training (counted per step with ``FlopCounterMode`` on the first
steps of every epoch and scaled by the epoch's batch count), the wall time of the fit (informative only:
accuracy records are made on a possibly busy machine; cost comparisons use FLOPs and the separate timing
run), and clean, PGD-20 and AutoAttack accuracy on the test images.

``--model NAME`` trains a suite's rows with the network of ``configs/models/NAME.yaml`` (added after the base) and
records them as the suite ``<suite>_NAME``.

A run's seed is ``--seed_everything``: it draws the initial weights. The training order and augmentation (the
data module's ``shuffle_seed``) and the per-step draws (PGD's random starts, random selection: the module's
``seed``) keep their configured values, 0, at every seed, so the spread over seeds is that of the initial weights
with the data, the starts and random selection's draws held fixed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RECORDS = HERE / "records"
RUNS = HERE / "runs"  # logs and checkpoints of the runs (not committed)


@dataclass(frozen=True)
class Run:
    """One row of the matrix at one seed: a shipped recipe overlay on the suite's base config, plus overrides."""

    name: str  # row label, e.g. "ds" or "selective_margin"
    config: str  # overlay file(s) after the suite's base, relative to configs/, joined by "+", combined in order
    seed: int
    extra: tuple[str, ...] = ()  # CLI overrides of this row only
    pre: str | None = None  # overlay(s) fitted first, in the same folder (the stability baseline's profiling run)

    @property
    def run_id(self) -> str:
        return f"{self.name}-s{self.seed}"


@dataclass(frozen=True)
class Suite:
    """A data set, the overrides that make every row of it share model, data, attack and budget, and its rows."""

    name: str
    base: str  # the data set's base config, relative to configs/: the first file of every run
    overrides: tuple[str, ...]
    test_batches: int  # test images = test_batches * test batch size (the data module's batch_size)
    eps: float  # pixels, L-inf; training and evaluation radius
    rows: tuple[Run, ...] = field(default_factory=tuple)
    aa_standard_batches: int = 0  # test batches for AutoAttack "standard" on the rows in aa_standard_rows
    aa_standard_rows: tuple[str, ...] = ()
    # Batch limits (counts of batches), set on the trainer after the configs are parsed.
    limits: tuple[tuple[str, int], ...] = ()
    timing_from: str | None = None  # a suite whose step timing holds for this one (same work per step)
    model: str | None = None  # a network overlay, configs/models/<model>.yaml, right after the base
    aa_implementation: str = "reference"  # AutoAttackConfig.implementation of the AutoAttack tests


MODELS = sorted(p.stem for p in (REPO / "configs" / "models").glob("*.yaml"))


def with_model(suite: Suite, model: str | None) -> Suite:
    """``suite`` training the network of ``configs/models/<model>.yaml``, recorded as the suite ``<suite>_<model>``
    (``suite`` itself for ``None`` or its own network)."""
    if model is None or model == suite.model:
        return suite
    if model not in MODELS:
        raise ValueError(f"`--model` must be one of {MODELS} (configs/models/), got {model!r}")
    return replace(suite, name=f"{suite.name}_{model}", model=model)


def _rows(spec: list[tuple]) -> tuple[Run, ...]:
    """Rows from ``(name, config, seeds, extra[, pre])`` tuples, one run per seed."""
    return tuple(Run(name, config, seed, extra, *rest) for name, config, seeds, extra, *rest in spec
                 for seed in seeds)


MARGIN_VAL = ("--model.init_args.eval_attack.loss", "margin")  # validation PGD on the logit margin
MARGIN_TRAIN = ("--model.init_args.train_attack.loss", "margin")  # training PGD on the logit margin
TWICE_THE_EPOCHS = ("--trainer.max_epochs", "20")  # epochs: twice the CPU CIFAR-10 suites' 10, same constant lr
# Epochs: 0.6 of the 10-epoch robust training's FLOPs, just under selective margin at 0.5 (0.65 of them).
SELECTIVE_BUDGET_EPOCHS = ("--trainer.max_epochs", "6")
# One forward with gradients over the whole pool, the loss over the selected rows: BatchNorm normalizes the
# selected rows by the pool's statistics and its running statistics follow the pool, not the selected rows.
SHARED_FORWARD = ("--model.init_args.selection_forward", "shared")
# Three quarters of the pool backpropagated, between DS's half and the whole pool.
THREE_QUARTERS = ("--model.init_args.p_up", "0.75")

# The paper's dashboards on the DS run (Figs. 7 and 8): selection make-up, minimum perturbation, figures.
DASHBOARD = ("--trainer.callbacks+=lightning_advsel.callbacks.SelectionMakeup",
             "--trainer.callbacks+=lightning_advsel.callbacks.MinimumPerturbation",
             "--trainer.callbacks+=lightning_advsel.callbacks.PaperFigures")


def _budget(data_dir: str, train_size: int, batch_size: int, epochs: int) -> tuple[str, ...]:
    """Overrides for the data a suite reads and how long it trains."""
    return ("--data.init_args.data_dir", data_dir,
            "--data.init_args.train_size", str(train_size),  # images, a fixed seeded subset of the training split
            "--data.init_args.batch_size", str(batch_size),  # clean samples per batch (b')
            "--trainer.max_epochs", str(epochs))


def _attacks(eps: float, alpha: float, steps: int, eval_alpha: float, eval_steps: int) -> tuple[str, ...]:
    """Overrides for the training and validation attacks: L-inf radius ``eps`` and steps ``alpha``, in pixels."""
    return ("--model.init_args.train_attack.eps", str(eps),
            "--model.init_args.train_attack.alpha", str(alpha),
            "--model.init_args.train_attack.steps", str(steps),
            "--model.init_args.eval_attack.eps", str(eps),
            "--model.init_args.eval_attack.alpha", str(eval_alpha),
            "--model.init_args.eval_attack.steps", str(eval_steps))


def suites(data_dir: str) -> dict[str, Suite]:
    """The matrices. ``data_dir`` is where MNIST and CIFAR-10 are read from."""
    seeds3 = (0, 1, 2)
    mnist_eps = 0.1
    # MNIST at eps 0.1, not the usual 0.3: on this CPU budget eps 0.3 training learns a model that PGD finds
    # robust and AutoAttack does not (SmallCNN, 12,000 images, 5 epochs, PGD-10: 65% PGD-50, 17% APGD).
    mnist = Suite(
        name="mnist",
        base="mnist/base.yaml",
        eps=mnist_eps,
        test_batches=10,  # 1,000 test images (the first of the test split), batch 100
        aa_standard_batches=5,  # 500 of them
        aa_standard_rows=("robust", "ds", "selective_margin"),
        overrides=(
            *_budget(data_dir, 20000, 100, 5),  # 20,000 of the 55,000 training images
            "--model.init_args.model.init_args.width", "16",  # channels of the first conv block
            "--model.init_args.model.init_args.hidden", "256",
            *_attacks(mnist_eps, 0.025, 10, 0.01, 20),
            "--model.init_args.optimizer.init_args.lr", "0.001",
        ),
        limits=(("limit_val_batches", 5),),  # 500 validation images per epoch
        rows=_rows([
            ("robust", "recipes/robust.yaml", seeds3, ()),
            ("standard", "recipes/standard.yaml", (0,), ()),
            ("ds", "recipes/ds.yaml", (0,), DASHBOARD),
            ("ds", "recipes/ds.yaml", (1, 2), ()),
            ("ds_adaptive", "recipes/ds_adaptive.yaml", (0,), ()),
            ("ds_p1", "recipes/ds_p1.yaml", (0,), ()),  # the DS paper's "P_up = 1" reference: the whole pool
            ("selective_margin", "recipes/selective_margin.yaml", seeds3, ()),
            ("random", "recipes/random.yaml", seeds3, ()),
            ("stability", "recipes/stability.yaml", (0,), (), "recipes/stability_profile.yaml"),
            ("selective_gradmatch", "recipes/selective_gradmatch.yaml", (0,), ()),
            ("selective_ds", "recipes/selective_ds.yaml", seeds3, ()),
        ]),
    )
    # CIFAR-10 (JPEG copy) at a budget a 2-core CPU carries: the SmallCNN instead of ResNet-18, 10,000 training
    # images, 10 epochs, PGD-7 training (Madry et al.'s CIFAR-10 attack); seeds 0-2 for robust, ds, ds at
    # P_up 1, random and selective margin, seed 0 for the other rows.
    cifar_eps = 0.03137  # 8/255
    cifar10 = Suite(
        name="cifar10",
        base="cifar10/base.yaml",
        eps=cifar_eps,
        test_batches=5,  # 500 test images (the first of the test split), batch 100
        aa_standard_batches=2,  # 200 of them
        aa_standard_rows=("robust", "ds", "selective_margin"),
        overrides=(
            *_budget(data_dir, 10000, 100, 10),  # 10,000 of the 45,000 training images
            "--model.init_args.model", "lightning_advsel.models.SmallCNN",
            "--model.init_args.model.init_args.in_channels", "3",
            "--model.init_args.model.init_args.input_size", "32",  # pixels per side
            "--model.init_args.model.init_args.width", "16",  # channels of the first conv block
            "--model.init_args.model.init_args.hidden", "256",
            "--model.init_args.model.init_args.mean", "[0.4914, 0.4822, 0.4465]",  # pixel units
            "--model.init_args.model.init_args.std", "[0.2470, 0.2435, 0.2616]",
            *_attacks(cifar_eps, 0.00784, 7, 0.00784, 10),  # step 2/255
            "--model.init_args.optimizer.init_args.lr", "0.01",  # SGD, momentum 0.9 (the base's)
        ),
        limits=(("limit_val_batches", 5),),  # 500 validation images per epoch
        rows=_rows([
            ("robust", "recipes/robust.yaml", seeds3, ()),
            ("standard", "recipes/standard.yaml", (0,), ()),
            ("ds", "recipes/ds.yaml", seeds3, ()),
            ("ds_p1", "recipes/ds_p1.yaml", seeds3, ()),  # the DS paper's "P_up = 1" reference: the whole pool
            ("random", "recipes/random.yaml", seeds3, ()),
            ("selective_margin", "recipes/selective_margin.yaml", seeds3, ()),
            ("selective_ds", "recipes/selective_ds.yaml", (0,), ()),
            ("ds_adaptive", "recipes/ds_adaptive.yaml", (0,), ()),
            ("stability", "recipes/stability.yaml", (0,), (), "recipes/stability_profile.yaml"),
            ("selective_gradmatch", "recipes/selective_gradmatch.yaml", (0,), ()),
        ]),
    )
    # The same budget with the training radius ramped up over the first 2 of the 10 epochs (eps_warmup_epochs):
    # robust training at full radius from the first step kept a constant prediction at seeds 1 and 2 above. The
    # rows the cifar10 suite runs at three seeds, at the same seeds.
    cifar10_warmup = replace(
        cifar10,
        name="cifar10_warmup",
        overrides=(*cifar10.overrides, "--model.init_args.eps_warmup_epochs", "2"),  # epochs
        timing_from="cifar10",  # the ramp changes the radius, not the attack steps or the rows trained
        rows=tuple(run for run in cifar10.rows if run.name in {r.name for r in cifar10.rows if r.seed == 2}),
    )
    # The warm-up suite with a BatchNorm after each convolution of the SmallCNN. DS at P_up 0.5 kept a constant
    # prediction there at every seed; the DS paper's network has BatchNorm, ours had none. Robust training and ds
    # at P_up 1 are the references, as above.
    cifar10_bn = replace(
        cifar10_warmup,
        name="cifar10_bn",
        overrides=(*cifar10_warmup.overrides, "--model.init_args.model.init_args.batch_norm", "true"),
        timing_from=None,  # BatchNorm adds work to a step: not the cifar10 suite's timing (FLOPs are counted)
        # selective_margin: the recipe level with robust training without BatchNorm; does it stay level with it?
        # random: the same half of the pool, drawn at random instead of by loss; is it the loss-ranking that
        # costs DS its robustness here, or backpropagating half the pool?
        rows=(*(run for run in cifar10_warmup.rows
                if run.name in ("robust", "ds", "selective_margin", "random") or run.run_id == "ds_p1-s0"),
              # The checkpoint kept by a validation PGD on the logit margin instead of the cross-entropy, which
              # overrates DS here (README): does the kept epoch, and what AutoAttack finds in it, change?
              *_rows([("ds_margin_val", "recipes/ds.yaml", seeds3, MARGIN_VAL),
                      ("robust_margin_val", "recipes/robust.yaml", (0,), MARGIN_VAL),
                      # And the training attack on the margin too: DS's pool is scored by the cross-entropy of
                      # examples attacked on the margin. Differs from ds_margin_val only in the training attack.
                      ("ds_margin", "recipes/ds.yaml", seeds3, (*MARGIN_VAL, *MARGIN_TRAIN)),
                      # Twice the epochs (the learning rate is constant over both budgets, the ramp the same 2
                      # epochs): is DS at P_up 0.5 slower to learn, or does it stay behind robust training?
                      ("ds_20ep", "recipes/ds.yaml", seeds3, TWICE_THE_EPOCHS),
                      ("robust_20ep", "recipes/robust.yaml", seeds3, TWICE_THE_EPOCHS),
                      # Robust training stopped at selective margin's compute: is the cheaper recipe worth it?
                      ("robust_6ep", "recipes/robust.yaml", seeds3, SELECTIVE_BUDGET_EPOCHS),
                      # The same selection with BatchNorm seeing the whole pool (the DS paper's accounting): is
                      # it the statistics of the high-loss rows alone that cost DS against random selection?
                      ("ds_shared", "recipes/ds.yaml", seeds3, SHARED_FORWARD),
                      # P_up 0.75: DS at 0.5 stays near chance here, at 1 it matches robust training (seed 0);
                      # does the robustness come back gradually with P_up, or only with the whole pool?
                      ("ds_p075", "recipes/ds.yaml", seeds3, THREE_QUARTERS)])),
    )
    # The papers' setting on one GPU (benchmarks/gpu_preset.sh): PreActResNet-18 on CIFAR-10 (JPEG copy), PGD-10
    # training at 8/255, bf16 autocast; a few epochs on part of the training split so that the four rows fit in
    # about 5 minutes on an H100/H200-class GPU. It shows relative cost and early robustness, not the papers'
    # 200-epoch accuracies.
    cifar10_gpu = Suite(
        name="cifar10_gpu",
        base="cifar10/base.yaml",
        eps=cifar_eps,
        test_batches=4,  # 1,024 test images (the first of the test split), batch 256
        overrides=(
            *_budget(data_dir, 20000, 256, 4),  # 20,000 of the 45,000 training images, b' = 256, 4 epochs
            "--trainer.accelerator", "gpu",
            "--trainer.precision", "bf16-mixed",
            *_attacks(cifar_eps, 0.00784, 10, 0.00784, 10),  # PGD-10, step 2/255
            "--model.init_args.lr_scheduler.init_args.milestones", "[3]",  # epochs: lr 0.1, then 0.01
        ),
        limits=(("limit_val_batches", 2),),  # 512 validation images per epoch
        rows=_rows([(name, f"recipes/{name}.yaml", (0,), ())
                    for name in ("robust", "ds", "selective_margin", "selective_ds")]),
        model="preact_resnet18",
        # The preset carries what the GPU machine lacks under a 64 MiB cap, with 21 MB of CIFAR-10 already: not
        # the reference AutoAttack's 42 MB wheel. Its records say torchattacks.
        aa_implementation="torchattacks",
    )
    tiny = Suite(
        name="tiny",
        base="digits/base.yaml",
        eps=0.1,
        test_batches=1,
        overrides=(
            "--trainer.max_epochs", "2",
            "--data.init_args.batch_size", "16",
            "--model.init_args.train_attack.steps", "2",
            "--model.init_args.eval_attack.steps", "3",
        ),
        limits=(("limit_train_batches", 2), ("limit_val_batches", 1)),
        rows=_rows([
            ("robust", "recipes/robust.yaml", (0,), ()),
            ("ds", "recipes/ds.yaml", (0,), DASHBOARD),
            ("stability", "recipes/stability.yaml", (0,), (), "recipes/stability_profile.yaml"),
        ]),
    )
    return {s.name: s for s in (mnist, cifar10, cifar10_warmup, cifar10_bn, cifar10_gpu, tiny)}


# ------------------------------------------------------------------------------------------------ one run
def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lightning_advsel", "configs"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


@dataclass
class Fitted:
    """A fitted run: the CLI that fitted it, the arguments a test of it builds on, and what the fit cost."""

    cli: Any  # lightning_advsel.cli.AdvSelCLI
    common: list[str]  # the run's configs and overrides, without its seed and logger
    checkpoint: Path  # the tested model (see fit_run)
    seconds: float
    flops: Any  # flop_count.CountFlops of the run
    profile_flops: int = 0
    profile_steps: int = 0

    @property
    def log_dir(self) -> Path:
        return Path(self.cli.trainer.log_dir)


def fit_run(suite: Suite, run: Run, runs_dir: Path) -> Fitted:
    """Fit one run through the CLI (after its profiling run, if it has one), counting its FLOPs; its logs and
    checkpoints go to ``<runs_dir>/<suite>/``, and the working folder becomes ``<runs_dir>/<suite>/<run>``.

    The tested model is the epoch with the best validation robust accuracy, which the MNIST and CIFAR-10 configs
    keep (early stopping against robust overfitting), for every row alike; the last epoch where a config keeps no
    such checkpoint (digits, the tiny suite). On CPU the fit is deterministic: a refit gives the same weights.
    """
    import torch
    from flop_count import CountFlops

    from lightning_advsel.cli import build_cli

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    save_dir = (runs_dir / suite.name).resolve()
    common = [*_config_args(suite, run.config), *suite.overrides, *run.extra, "--trainer.enable_progress_bar", "false"]
    work = runs_dir / suite.name / run.run_id  # the stability profile's relative path lands here
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    profile_flops = profile_steps = 0
    start = time.perf_counter()
    if run.pre:
        pre_counter = CountFlops()
        pre = build_cli([*_config_args(suite, run.pre), *suite.overrides,
                         "--trainer.enable_progress_bar", "false", "--seed_everything", str(run.seed),
                         "--trainer.logger.init_args.save_dir", str(save_dir),
                         "--trainer.logger.init_args.name", f"{run.name}_profile",
                         "--trainer.logger.init_args.version", f"seed{run.seed}"], run=False)
        pre.trainer.callbacks.append(pre_counter)
        _limit(pre.trainer, suite)
        pre.trainer.fit(pre.model, datamodule=pre.datamodule)
        profile_flops, profile_steps = pre_counter.total_flops, int(pre.trainer.global_step)
    counter = CountFlops()
    cli = build_cli([*common, "--seed_everything", str(run.seed),
                     "--trainer.logger.init_args.save_dir", str(save_dir),
                     "--trainer.logger.init_args.name", run.name,
                     "--trainer.logger.init_args.version", f"seed{run.seed}"], run=False)
    cli.trainer.callbacks.append(counter)
    _limit(cli.trainer, suite)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    monitored = [cb for cb in cli.trainer.checkpoint_callbacks if cb.monitor == "val/acc_robust"]
    ckpt = Path(monitored[0].best_model_path if monitored else cli.trainer.checkpoint_callback.last_model_path)
    return Fitted(cli, common, ckpt, time.perf_counter() - start, counter, profile_flops, profile_steps)


def _do_run(suite: Suite, run: Run, records: Path, runs_dir: Path, fit_only: bool = False) -> dict:
    """Fit, then test with PGD-20 and AutoAttack; returns the record (in this process: the child's job).

    The PNG figures the run's ``PaperFigures`` callback drew (Figs. 7 and 8 of the DS paper) are copied next to
    the records, to ``<records>/../figures/<suite>_<run>_<figure>.png``. ``fit_only`` stops after that copy and
    returns ``{"figures": [...]}``: the fit is deterministic on CPU, so it redraws the figures of a recorded run.
    """
    import yaml

    from lightning_advsel.cli import build_cli

    fitted = fit_run(suite, run, runs_dir)
    cli, common, ckpt, log_dir = fitted.cli, fitted.common, fitted.checkpoint, fitted.log_dir
    figures = _copy_figures(log_dir, records.parent / "figures", f"{suite.name}_{run.run_id}")
    if fit_only:
        return {"figures": figures}
    resolved = yaml.safe_load((log_dir / "config.yaml").read_text())

    def test(attack: list[str], batches: int) -> dict:
        t0 = time.perf_counter()
        tested = build_cli([*common, "--seed_everything", str(run.seed), "--trainer.logger", "false",
                            "--trainer.default_root_dir", str(log_dir), *attack], run=False)
        tested.trainer.limit_test_batches = batches
        tested.trainer.test(tested.model, datamodule=tested.datamodule, ckpt_path=str(ckpt))
        m = tested.trainer.callback_metrics
        attack = tested.model.robust_attack("test")
        return {"clean": float(m["test/acc_clean"]), "robust": float(m["test/acc_robust"]),
                "attack": attack.describe(), "seconds": time.perf_counter() - t0,
                "images": batches * int(resolved["data"]["init_args"]["batch_size"]),
                **({"implementation": attack.implementation} if hasattr(attack, "implementation") else {})}

    eps = str(suite.eps)
    implementation = ("--model.init_args.test_attack.implementation", suite.aa_implementation)
    results = {
        "pgd20": test(["--model.init_args.test_attack", "AttackConfig", "--model.init_args.test_attack.eps", eps,
                       "--model.init_args.test_attack.alpha", "0.01", "--model.init_args.test_attack.steps", "20",
                       "--model.init_args.test_attack.mode", "eval"], suite.test_batches),
        "aa_apgd": test(["--model.init_args.test_attack", "AutoAttackConfig",
                         "--model.init_args.test_attack.eps", eps, *implementation,
                         "--model.init_args.test_attack.version", "apgd"], suite.test_batches),
    }
    if run.name in suite.aa_standard_rows and run.seed == 0 and suite.aa_standard_batches:
        results["aa_standard"] = test(["--model.init_args.test_attack", "AutoAttackConfig",
                                       "--model.init_args.test_attack.eps", eps, *implementation,
                                       "--model.init_args.test_attack.version", "standard"],
                                      suite.aa_standard_batches)
    return {
        "suite": suite.name, "row": run.name, "seed": run.seed, "config_files": _config_files(suite, run.config),
        "overrides": [*suite.overrides, *run.extra], "resolved_config": resolved, "commit": _commit(),
        "machine": _machine(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "fit_seconds": fitted.seconds, "train_flops": fitted.flops.total_flops,
        "flops_per_epoch": fitted.flops.per_epoch, "profile_flops": fitted.profile_flops,
        "profile_steps": fitted.profile_steps,
        "profile_config": run.pre and _config_files(suite, run.pre),
        "epochs": int(cli.trainer.current_epoch), "steps": int(cli.trainer.global_step), "figures": figures,
        "val": {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")},
        "tested_checkpoint": ckpt.name,
        "test": results,
    }


def _copy_figures(log_dir: Path, out: Path, prefix: str) -> list[str]:
    """Copy ``<log_dir>/figures/*.png`` to ``out/<prefix>_<name>.png``; the copied file names."""
    import shutil

    names = []
    for png in sorted((log_dir / "figures").glob("*.png")):
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, out / f"{prefix}_{png.name}")
        names.append(f"{prefix}_{png.name}")
    return names


def _config_files(suite: Suite, overlays: str) -> list[str]:
    """The files of a run, relative to configs/: the suite's base, its network overlay, then the "+"-joined
    overlays."""
    return [suite.base, *([f"models/{suite.model}.yaml"] if suite.model else []), *overlays.split("+")]


def _config_args(suite: Suite, overlays: str) -> list[str]:
    return [arg for c in _config_files(suite, overlays) for arg in ("--config", str(REPO / "configs" / c))]


def _limit(trainer, suite: Suite) -> None:  # noqa: ANN001 - a lightning Trainer
    for name, value in suite.limits:
        setattr(trainer, name, value)


def _record_path(records: Path, suite: str, run: Run) -> Path:
    return records / suite / f"{run.run_id}.json"


def run_suite(suite: Suite, only: list[str] | None, records: Path, runs_dir: Path, data_dir: str,
              seeds: list[int] | None = None, model: str | None = None) -> None:
    """Run the suite's rows (or those named in ``only``, at the ``seeds`` given) whose record is missing."""
    # Seed 0 of every row first: a partly filled matrix then holds every recipe once.
    todo = sorted((r for r in suite.rows if (not only or r.name in only) and (seeds is None or r.seed in seeds)),
                  key=lambda r: r.seed)
    for run in todo:
        path = _record_path(records, suite.name, run)
        if path.exists():
            print(f"[skip] {suite.name}/{run.run_id}: record exists", flush=True)
            continue
        print(f"[run ] {suite.name}/{run.run_id}", flush=True)
        cmd = [sys.executable, __file__, "_one", suite.name.removesuffix(f"_{model}") if model else suite.name,
               run.run_id, "--records", str(records), "--runs", str(runs_dir), "--data-dir", data_dir,
               *(["--model", model] if model else [])]
        # This checkout first, then the caller's path (packages installed with pip --target, say).
        path_dirs = [str(HERE), str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": os.pathsep.join(path_dirs)})
        if proc.returncode:
            print(f"[fail] {suite.name}/{run.run_id}: exit {proc.returncode}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("run", "list", "_one", "figures"):
        p = sub.add_parser(name)
        p.add_argument("suite")
        if name in ("_one", "figures"):
            p.add_argument("run_id")
        p.add_argument("--data-dir", default="data", help="folder holding MNIST/raw and the CIFAR-10 copy")
        p.add_argument("--records", type=Path, default=RECORDS)
        p.add_argument("--runs", type=Path, default=RUNS)
        p.add_argument("--only", nargs="*", help="row names to run (default: all)")
        p.add_argument("--seeds", nargs="*", type=int, help="seeds to run (default: all the suite holds)")
        p.add_argument("--model", choices=MODELS, help="train with configs/models/MODEL.yaml (default: the suite's)")
    rep = sub.add_parser("report")
    rep.add_argument("--records", type=Path, default=RECORDS)
    rep.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)
    args.records = args.records.resolve()  # a run changes its working folder
    if args.cmd != "report":
        args.runs = args.runs.resolve()
    if args.cmd == "report":
        from report import write_report

        write_report(args.records, args.out)
        return
    all_suites = suites(str(Path(args.data_dir).resolve()))
    if args.suite not in all_suites:
        parser.error(f"suite must be one of {sorted(all_suites)}, got {args.suite!r}")
    suite = with_model(all_suites[args.suite], args.model)
    if args.cmd == "list":
        for run in suite.rows:
            state = "done" if _record_path(args.records, suite.name, run).exists() else "todo"
            print(f"{state}  {suite.name}/{run.run_id}  {' + '.join(_config_files(suite, run.config))}  "
                  f"{' '.join(run.extra)}")
    elif args.cmd == "run":
        run_suite(suite, args.only, args.records, args.runs, args.data_dir, args.seeds, args.model)
    else:
        run = next((r for r in suite.rows if r.run_id == args.run_id), None)
        if run is None:
            parser.error(f"run_id must be one of {[r.run_id for r in suite.rows]}, got {args.run_id!r}")
        path = _record_path(args.records, suite.name, run)
        if args.cmd == "figures":  # a recorded run learns the names of its redrawn figures
            figures = _do_run(suite, run, args.records, args.runs, fit_only=True)["figures"]
            if path.exists():
                path.write_text(json.dumps({**json.loads(path.read_text()), "figures": figures}, indent=1,
                                           sort_keys=True))
            print(f"[figures] {suite.name}/{run.run_id}: {figures}", flush=True)
            return
        record = _do_run(suite, run, args.records, args.runs)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
        tmp.replace(path)  # a record exists only once the run has finished
        print(f"[done] {suite.name}/{run.run_id}: {json.dumps(record['test'])}", flush=True)


if __name__ == "__main__":
    main()
