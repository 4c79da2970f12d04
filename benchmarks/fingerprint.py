"""Hashes of short digits fits: the trained weights, every logged value, the checkpoint's own state.

A change that must not change any number (a refactor) runs this before and after and compares the tables. Each
fit goes through the command line's parser with the shipped configs (digits base, a recipe overlay, a few
overrides), trains two epochs of three batches, validates on two batches, tests on one, and reports three hashes:

* **weights**: every entry of the module's ``state_dict`` (name, dtype, shape and bytes);
* **metrics**: every value the module and the callbacks logged (each step, each epoch, the test), in the order
  Lightning handed them to the loggers, as exact floats, except the seconds per epoch; a fit that predicts adds
  its predictions;
* **state**: the last checkpoint's ``advsel`` entry, its hyperparameters and its state dict's keys, so that a
  change of the checkpoint format shows even where the weights agree.

The fits cover every recipe and pre-attack score, the adaptive ``P_up`` with the dashboards, a step-wise
scheduler with TRADES and the radius warm-up, and gradient accumulation with clipping, ``nonfinite: skip`` (a NaN
put into one training batch), two validation loaders and an attacked ``predict``.

    python benchmarks/fingerprint.py                                  # the table
    python benchmarks/fingerprint.py --out benchmarks/records/fingerprint.json
    python benchmarks/fingerprint.py --only ds accumulation --compare benchmarks/records/fingerprint.json

Hashes hold on one machine and one torch build: CPU kernels of another processor may round differently.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
BASE = "digits/base.yaml"
# Two epochs of three batches of 32: enough for an epoch boundary, a per-epoch callback and a partial window;
# PGD-5 for validation and test (a hash needs the path taken, not a strong attack).
SHORT = ("--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
         "--trainer.limit_test_batches", "1", "--trainer.limit_predict_batches", "1", "--trainer.log_every_n_steps",
         "1", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--data.init_args.batch_size", "32", "--model.init_args.eval_attack.steps", "5")
CLOCKS = ("cost/epoch_seconds",)  # logged values that measure wall time: left out of the metrics hash
NAN_BATCH = (0, 1)  # (epoch, batch index) of the training batch that gets a NaN in the `accumulation` fit

# Name: (config overlays after the base, relative to configs/, and overrides of this fit).
FITS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "standard": (("recipes/standard.yaml",), ()),
    "robust": (("recipes/robust.yaml",), ()),
    "ds": (("recipes/ds.yaml",), ("--data.init_args.return_index", "true",
                                  "--model.init_args.selection_forward", "shared")),
    "random_mart": (("recipes/random.yaml", "objectives/mart.yaml"), ()),
    "selective_margin": (("recipes/selective_margin.yaml",), ("--model.init_args.attack_warmup_epochs", "1")),
    "selective_ds_loss": (("recipes/selective_ds.yaml",), ("--model.init_args.attack_score", "loss")),
    "selective_gradmatch": (("recipes/selective_gradmatch.yaml",), ()),
    "selective_gradmatch_exact": (("recipes/selective_gradmatch.yaml",),
                                  ("--model.init_args.attack_score", "gradmatch_exact")),
    "selective_random": (("recipes/selective_margin.yaml",), ("--model.init_args.attack_score", "random")),
    "selective_authors": (("recipes/selective_authors.yaml",), ("--model.init_args.attack_warmup_epochs", "1")),
    "ds_adaptive_dashboards": (("recipes/ds_adaptive.yaml", "callbacks/dashboards.yaml"), ()),
    "trades_one_cycle": (("recipes/robust.yaml", "objectives/trades.yaml", "schedules/one_cycle.yaml"),
                         ("--model.init_args.eps_warmup_epochs", "1")),
    "accumulation": (("recipes/ds.yaml",), ("--model.init_args.accumulate_grad_batches", "2",
                                            "--model.init_args.gradient_clip_val", "1.0",
                                            "--model.init_args.nonfinite", "skip")),
}
PREDICTS = {"accumulation"}  # fits that also predict, with an attack, on one test batch
TWO_VAL_LOADERS = {"accumulation"}  # fits validated on two loaders (the validation set twice)


class Recorder(Logger):
    """Keeps every ``log_metrics`` call: ``(step, {name: value})`` in the order Lightning made them, less
    :data:`CLOCKS`."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "fingerprint"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, {key: float(value) for key, value in metrics.items() if key not in CLOCKS}))


class NaNBatch(Callback):
    """Puts a NaN into the first input of one training batch (in place, before the module reads it)."""

    def __init__(self, epoch: int, batch_idx: int) -> None:
        self.at = (epoch, batch_idx)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if (trainer.current_epoch, batch_idx) == self.at:
            batch[0].view(-1)[0] = float("nan")


def _canonical(value: Any) -> Any:
    """``value`` as JSON-ready plain data: tensors as dtype, shape and the hash of their bytes, floats exact."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        return {"dtype": str(t.dtype), "shape": list(t.shape), "sha256": hashlib.sha256(raw).hexdigest()}
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float):
        return value.hex()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return repr(value)


def digest(value: Any) -> str:
    """The first 16 hex digits of the SHA-256 of ``value``'s canonical JSON."""
    text = json.dumps(_canonical(value), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextmanager
def _inside(folder: Path) -> Iterator[None]:
    """Work in ``folder`` (the logs and checkpoints of a fit land there), then return."""
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def fit_args(name: str) -> list[str]:
    """The command line of fit ``name`` (without the subcommand)."""
    overlays, overrides = FITS[name]
    args = []
    for config in (BASE, *overlays):
        args += ["--config", str(CONFIGS / config)]
    return [*args, *SHORT, *overrides]


def run_fit(name: str) -> dict[str, Any]:
    """Train, test (and predict) fit ``name`` in a temporary folder; its hashes and what it logged."""
    from lightning_advsel.attacks import AttackConfig
    from lightning_advsel.cli import build_cli

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder, _inside(Path(folder)), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = build_cli(fit_args(name), run=False)
        trainer, module, data = cli.trainer, cli.model, cli.datamodule
        recorder = Recorder()
        trainer.loggers = [*trainer.loggers, recorder]
        if name == "accumulation":
            trainer.callbacks.append(NaNBatch(*NAN_BATCH))
        if name in TWO_VAL_LOADERS:
            val_loader = data.val_dataloader
            data.val_dataloader = lambda: [val_loader(), val_loader()]
        trainer.fit(module, datamodule=data)
        checkpoint = torch.load(Path(trainer.checkpoint_callback.last_model_path), map_location="cpu",
                                weights_only=False)
        trainer.test(module, datamodule=data, verbose=False)
        predictions = None
        if name in PREDICTS:
            module.predict_attack = AttackConfig(eps=0.1, alpha=0.025, steps=3)
            predictions = trainer.predict(module, datamodule=data)
    state = {"advsel": checkpoint["advsel"], "hyper_parameters": checkpoint["hyper_parameters"],
             "state_dict_keys": sorted(checkpoint["state_dict"])}
    return {"weights": digest(module.state_dict()), "metrics": digest([recorder.records, predictions]),
            "state": digest(state), "values_logged": sum(len(m) for _, m in recorder.records),
            "seconds": round(time.perf_counter() - started, 1)}


def table(results: dict[str, dict[str, Any]], compare: dict[str, dict[str, Any]] | None = None) -> str:
    """The results as a text table; with ``compare``, a last column saying which hashes differ from it."""
    head = f"{'fit':<27} {'weights':<16}  {'metrics':<16}  {'state':<16}  {'values':>6}  {'s':>5}"
    rows = [head + ("  vs record" if compare else ""), "-" * len(head)]
    for name, r in results.items():
        row = f"{name:<27} {r['weights']}  {r['metrics']}  {r['state']}  {r['values_logged']:>6}  {r['seconds']:>5}"
        if compare is not None:
            old = compare.get(name)
            diff = ("no record" if old is None else
                    ", ".join(k for k in ("weights", "metrics", "state") if old[k] != r[k]) or "same")
            row += f"  {diff}"
        rows.append(row)
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run the fits asked for, print the table, write ``--out``; return ``{fit: hashes}``.

    Raises:
        SystemExit: for an unknown fit name, or (status 1) with ``--compare`` when a hash differs from the record.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(FITS), help="these fits only (default: all)")
    parser.add_argument("--out", type=Path, help="write the hashes as JSON here")
    parser.add_argument("--compare", type=Path, help="a JSON written by --out: exit 1 if any hash differs")
    args = parser.parse_args(argv)
    results = {name: run_fit(name) for name in (args.only or FITS)}
    record = json.loads(args.compare.read_text())["fits"] if args.compare else None
    print(table(results, record), flush=True)
    if args.out:
        machine = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                   "processor": platform.processor(), "threads": torch.get_num_threads()}
        args.out.write_text(json.dumps({"machine": machine, "fits": results}, indent=2) + "\n")
    if record is not None and any(record.get(name, {}).get(k) != r[k] for name, r in results.items()
                                  for k in ("weights", "metrics", "state")):
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
