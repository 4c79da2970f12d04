"""One training epoch from the command line on CIFAR-10 (JPEG copy), the compiled attack against the eager one.

The images per second a user sees: ``lightning-advsel fit`` (parsed as the command parses it, then fitted) with
``configs/cifar10/base.yaml``, a recipe and ``configs/trainer/gpu_bf16.yaml`` for one epoch (no validation),
through ``CIFAR10DataModule`` with its data loading, once as configured and once with
``--model.init_args.compile_attack true``. The epoch's wall time is the module's own ``cost/epoch_seconds`` (from
the epoch's first hook to its last, so compilation inside the first steps counts, as a user pays it); the images
are those the epoch's batches held. Each run is printed and appended to ``--json`` as it finishes (eager first, so
a short session still has the reference). The module reads its clock without synchronizing a GPU: work still
queued at the epoch's end (at most the last steps of some 176) falls outside it. The decoded JPEGs are cached
after the first run (``CIFAR10DataModule``'s ``cache_dir``): that decode is in the first run's ``fit_s``, not in
its epoch.
Every argument this script does not know goes to the command line as an override::

    python benchmarks/cli_epoch.py --data-dir .gpu/data --json OUT/cli_epoch.json          # CUDA, bf16
    python benchmarks/cli_epoch.py --device cpu --data-dir ../shared/data --attack-backend aot_eager \\
        --trainer.limit_train_batches 2 --data.init_args.batch_size 8    # the code path on CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_advsel import dashboard
from lightning_advsel.attack_compilation import AttackCompilation
from lightning_advsel.cli import build_cli

REPO = Path(__file__).resolve().parent.parent
RECIPES = ("robust", "selective_margin")  # overlays of configs/recipes/, in order of importance


class ImageCount(Callback):
    """Counts the images of the training batches (a short last batch counts what it holds)."""

    def __init__(self) -> None:
        self.images = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.images += int(batch[0].shape[0])


def cli_args(recipe: str, compiled: bool, args: argparse.Namespace, extra: list[str], save_dir: str) -> list[str]:
    configs = ["configs/cifar10/base.yaml", f"configs/recipes/{recipe}.yaml"]
    device = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true"]
    if args.device == "cuda":
        configs.append("configs/trainer/gpu_bf16.yaml")
        device = []
    return [*[a for c in configs for a in ("--config", str(REPO / c))], *device,
            "--data.init_args.data_dir", str(args.data_dir), "--trainer.max_epochs", "1",
            # The epoch alone: validation would run inside the epoch's hooks and add its own attack.
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", save_dir,
            "--model.init_args.compile_attack", str(compiled).lower(), *extra]


def run_epoch(recipe: str, compiled: bool, args: argparse.Namespace, extra: list[str]) -> dict:
    """One ``fit`` of one epoch; its images, epoch seconds and images per second."""
    with tempfile.TemporaryDirectory() as save_dir:
        start = time.perf_counter()
        cli = build_cli(cli_args(recipe, compiled, args, extra, save_dir), run=False)
        counter = ImageCount()
        cli.trainer.callbacks.append(counter)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        fit_s = time.perf_counter() - start
    epoch_s = float(cli.trainer.callback_metrics[dashboard.EPOCH_SECONDS])
    compilation = cli.model.attack_compilation
    return {"recipe": recipe, "compile_attack": compiled, "images": counter.images,
            "batches": cli.trainer.global_step, "batch_size": cli.datamodule.batch_size,
            "epoch_s": round(epoch_s, 3), "images_per_s": round(counter.images / epoch_s, 2),
            "fit_s": round(fit_s, 3),
            # Whether the epoch's attack really ran as a graph (a setting that stays eager says why at fit start).
            "attack_compiled": compiled and compilation.train is not None,
            "precision": str(cli.trainer.precision), "device": str(cli.trainer.strategy.root_device)}


def append_json(path: Path, record: dict) -> None:
    records = json.loads(path.read_text()) if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([*records, record], indent=1) + "\n")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda: with configs/trainer/gpu_bf16.yaml; cpu: float32 on the CPU")
    parser.add_argument("--data-dir", type=Path, required=True,
                        help="the folder holding cifar10-jpeg/cifar10-jpeg.tar.gz")
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    parser.add_argument("--attack-backend", default="inductor",
                        help="torch.compile's backend for the compiled attack (aot_eager: no code generation)")
    parser.add_argument("--json", type=Path, default=None, help="append one record per run to this JSON list")
    args, extra = parser.parse_known_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; pass --device cpu for the code path on CPU")
    # The module's option takes the backend from its class: set here, so both runs differ in the option alone.
    AttackCompilation.backend = args.attack_backend
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    rows = []
    print("| recipe | compile_attack | images | epoch s | images/s | fit s |")
    print("|---|---|---:|---:|---:|---:|")
    for recipe in args.recipes:
        for compiled in (False, True):
            row = run_epoch(recipe, compiled, args, extra)
            rows.append(row)
            print(f"| {recipe} | {str(compiled).lower()} | {row['images']} | {row['epoch_s']:.2f} | "
                  f"{row['images_per_s']:.1f} | {row['fit_s']:.1f} |", flush=True)
            if args.json:
                append_json(args.json, {"benchmark": "cli_epoch", "when": stamp, "machine": gpu,
                                        "torch": torch.__version__, "overrides": extra, **row})
    for recipe in args.recipes:
        eager, compiled = (r for r in rows if r["recipe"] == recipe)
        print(f"{recipe}: compiled / eager, images per second: "
              f"{compiled['images_per_s'] / eager['images_per_s']:.2f}x")
    return rows


if __name__ == "__main__":
    main()
