"""The evidence re-measured with AutoAttack's reference code, beside torchattacks' numbers on the same weights.

The records of ``reproduce.py`` hold AutoAttack accuracy from torchattacks' port, which runs 10 iterations per
attack where Croce and Hein's reference code runs 100. This script refits the rows the README's claims rest on
(robust, ds, selective margin and random, seeds 0-2, on MNIST and on ``cifar10_bn``: the fit is deterministic on
CPU, so a refit gives the tested weights again) and evaluates each refit with both implementations through
``lightning-advsel evaluate``, on the test images the records were tested on. It runs as steps, in this order:

1. ``apgd``, per row (seed 0 of every row first): the fit, unless its weights are kept from an earlier step;
   torchattacks' ``apgd`` (the records' number again: it checks that the refit reproduced the tested weights);
   the reference's ``apgd``;
2. ``standard``: the reference's standard version on the subset ``reproduce.py`` runs it on, at seed 0;
3. ``torchattacks_standard``: torchattacks' standard version on the same images and weights.

Each step writes what it measured into the row's record, ``<records>/<suite>/reference/<row>-s<seed>.json``, when it
finishes (with ``--commit``, and commits that record); a killed step resumes from the evaluated batches (the
partial results of ``lightning-advsel evaluate`` under ``<runs>/reference/``), and a rerun skips finished steps.
The evaluated weights (a Lightning checkpoint without the optimizer's state, which ``lightning-advsel evaluate
--ckpt_path`` loads) are kept beside the record where ``KEEP_WEIGHTS`` says so, else under ``<runs>``.

    python benchmarks/remeasure.py list                                         # the steps and which are done
    python benchmarks/remeasure.py run --data-dir /path/to/data --commit        # all the steps left
    python benchmarks/remeasure.py run --data-dir ... --phases apgd --suites mnist
    python benchmarks/reproduce.py report                                       # RESULTS.md with both numbers
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from reproduce import HERE, RECORDS, REPO, RUNS, Run, Suite, _commit, _config_args, _machine, fit_run, suites

ROWS = ("robust", "ds", "selective_margin", "random")  # the rows the README's claims compare
SUITES = ("mnist", "cifar10_bn")
PHASES = ("apgd", "standard", "torchattacks_standard")
FOLDER = "reference"  # <records>/<suite>/reference/: the re-measured rows
# Weights kept beside the records: the working tree travels to a GPU machine under a 64 MiB cap, beside the GPU
# preset's 21 MB of staged data; all 24 (1.7 MB per MNIST row, 2.2 MB per cifar10_bn row) would take 46 MB.
# cifar10_bn's are kept (10 minutes of CPU to refit each), and MNIST's at seed 0 (the standard version's rows).
KEEP_WEIGHTS = {"mnist": (0,), "cifar10_bn": (0, 1, 2)}
CHECKPOINT_KEYS = ("state_dict", "hyper_parameters", "pytorch-lightning_version", "epoch", "global_step")


@dataclass(frozen=True)
class Step:
    """One step: a phase of one row."""

    suite: Suite
    run: Run
    phase: str

    @property
    def evaluations(self) -> tuple[tuple[str, str, int], ...]:
        """``(implementation, version, test batches)`` of the evaluations this step runs, in order."""
        suite = self.suite
        if self.phase == "apgd":
            return (("torchattacks", "apgd", suite.test_batches), ("reference", "apgd", suite.test_batches))
        implementation = "reference" if self.phase == "standard" else "torchattacks"
        return ((implementation, "standard", suite.aa_standard_batches),)


def plan(all_suites: dict[str, Suite], names: tuple[str, ...] = SUITES, rows: tuple[str, ...] = ROWS,
         phases: tuple[str, ...] = PHASES) -> list[Step]:
    """The steps, in the order they run: phase by phase, and within ``apgd`` seed 0 of every row first."""
    runs = [(all_suites[name], run) for name in names for run in all_suites[name].rows if run.name in rows]
    steps = []
    for phase in phases:
        chosen = runs if phase == "apgd" else [(suite, run) for suite, run in runs
                                               if run.seed == 0 and run.name in suite.aa_standard_rows
                                               and suite.aa_standard_batches]
        steps += [Step(suite, run, phase) for suite, run in sorted(chosen, key=lambda pair: pair[1].seed)]
    return steps


def record_path(records: Path, step: Step) -> Path:
    return records / step.suite.name / FOLDER / f"{step.run.run_id}.json"


def weights_path(records: Path, runs: Path, step: Step) -> Path:
    """The evaluated weights: beside the record where ``KEEP_WEIGHTS`` keeps them, else under ``runs``."""
    if step.run.seed in KEEP_WEIGHTS.get(step.suite.name, ()):
        return records / step.suite.name / FOLDER / f"{step.run.run_id}.pt"
    return runs / FOLDER / step.suite.name / step.run.run_id / "weights.pt"


def evaluation_key(implementation: str, version: str) -> str:
    return f"{implementation}/{version}"


def done(records: Path, step: Step) -> bool:
    path = record_path(records, step)
    if not path.exists():
        return False
    evaluations = json.loads(path.read_text()).get("evaluations", {})
    return all(evaluation_key(i, v) in evaluations for i, v, _ in step.evaluations)


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _fit(step: Step, records: Path, runs: Path, weights: Path) -> dict:
    """Refit the row and keep its tested checkpoint's weights at ``weights``; what the record says of the fit."""
    import torch

    fitted = fit_run(step.suite, step.run, runs / FOLDER)  # logs apart from the original run's
    checkpoint = torch.load(fitted.checkpoint, map_location="cpu", weights_only=False)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_name(weights.name + ".tmp")
    torch.save({key: checkpoint[key] for key in CHECKPOINT_KEYS if key in checkpoint}, tmp)
    os.replace(tmp, weights)
    return {"tested_checkpoint": fitted.checkpoint.name, "epoch": int(checkpoint["epoch"]),
            "seconds": fitted.seconds, "commit": _commit(),
            "val": {k: float(v) for k, v in fitted.cli.trainer.callback_metrics.items() if k.startswith("val/")}}


def implementation_of(result: dict) -> str:
    """The AutoAttack implementation behind a record's test result: records from before the reference code was
    the default name none, and were torchattacks'."""
    return result.get("implementation", "torchattacks")


def reproduces(original: dict, record: dict) -> bool | None:
    """Whether the refit evaluates as the original record's tested weights did: the same clean and ``apgd``
    accuracy of the original's implementation on the same images, and the same tested checkpoint where the
    original names it (``None`` until that evaluation is in ``record``)."""
    tested = original["test"]["aa_apgd"]
    evaluation = record["evaluations"].get(evaluation_key(implementation_of(tested), "apgd"))
    if evaluation is None:
        return None
    fit = record.get("fit")
    # Lightning names a checkpoint "-v1" when its folder holds one of that name (a refit after a kill, say).
    name = re.sub(r"-v[0-9]+(?=\.ckpt$)", "", fit["tested_checkpoint"]) if fit else None
    same_checkpoint = fit is None or original.get("tested_checkpoint", name) == name
    return (same_checkpoint and tested["images"] == evaluation["images"]
            and abs(tested["robust"] - evaluation["robust"]) < 1e-6
            and abs(tested["clean"] - evaluation["clean"]) < 1e-6)


def evaluate_args(step: Step, implementation: str, version: str, batches: int) -> list[str]:
    """The arguments of ``lightning-advsel evaluate`` for one evaluation of the step's row, less the checkpoint and
    the report: the row's configs and overrides, and the attack on its first ``batches`` test batches."""
    return [*_config_args(step.suite, step.run.config), *step.suite.overrides, *step.run.extra,
            "--trainer.limit_test_batches", str(batches), "--model.init_args.test_attack", "AutoAttackConfig",
            "--model.init_args.test_attack.eps", str(step.suite.eps), "--model.init_args.test_attack.version", version,
            "--model.init_args.test_attack.implementation", implementation]


def run_step(step: Step, records: Path, runs: Path) -> dict:
    """Run one step in this process and write its results into the row's record; returns the record."""
    from lightning_advsel.cli import evaluate_checkpoint
    from lightning_advsel.evaluate_checkpoint import file_sha256

    path, weights = record_path(records, step), weights_path(records, runs, step)
    record = json.loads(path.read_text()) if path.exists() else {
        "suite": step.suite.name, "row": step.run.name, "seed": step.run.seed, "evaluations": {},
        "original_record": f"{step.suite.name}/{step.run.run_id}.json"}
    if not weights.exists():
        record["fit"] = _fit(step, records, runs, weights)
        _write_json(path, record)
    record["weights"] = {"path": str(weights.relative_to(REPO) if weights.is_relative_to(REPO) else weights),
                         "sha256": file_sha256(weights), "bytes": weights.stat().st_size,
                         "kept_beside_record": weights.parent == path.parent}
    for implementation, version, batches in step.evaluations:
        key = evaluation_key(implementation, version)
        if key in record["evaluations"]:
            continue
        out = runs / FOLDER / step.suite.name / step.run.run_id / f"{implementation}_{version}.json"
        record["evaluations"][key] = evaluate_checkpoint(
            ["--ckpt_path", str(weights), "--out", str(out), *evaluate_args(step, implementation, version, batches)])
        original = records / record["original_record"]
        if original.exists():
            record["reproduces_original"] = reproduces(json.loads(original.read_text()), record)
        record.update(commit=_commit(), machine=_machine(), finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        _write_json(path, record)
    return record


def _git_commit(files: list[Path], message: str, tries: int = 60) -> None:
    """Commit ``files`` alone, waiting while another git command holds the index."""
    names = [str(f.relative_to(REPO)) for f in files]
    for _ in range(tries):
        if not (REPO / ".git" / "index.lock").exists():
            add = subprocess.run(["git", "add", *names], cwd=REPO, capture_output=True, text=True)
            commit = add.returncode == 0 and subprocess.run(["git", "commit", "-q", "-m", message, "--", *names],
                                                            cwd=REPO, capture_output=True, text=True)
            if commit and commit.returncode == 0:
                return
        time.sleep(5)
    print(f"[warn] could not commit {names}; commit them by hand", flush=True)


def run_plan(steps: list[Step], records: Path, runs: Path, data_dir: str, commit: bool) -> None:
    """Run each step that is not done in a child process of its own, in order."""
    for step in steps:
        label = f"{step.suite.name}/{step.run.run_id} {step.phase}"
        if done(records, step):
            print(f"[skip] {label}: recorded", flush=True)
            continue
        print(f"[run ] {label}", flush=True)
        path_dirs = [str(HERE), str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        proc = subprocess.run([sys.executable, __file__, "_step", step.suite.name, step.run.run_id, step.phase,
                               "--records", str(records), "--runs", str(runs), "--data-dir", data_dir],
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(path_dirs)})
        if proc.returncode:
            print(f"[fail] {label}: exit {proc.returncode}", flush=True)
            continue
        print(f"[done] {label}", flush=True)
        if commit:
            weights = weights_path(records, runs, step)
            kept = [weights] if weights.parent == record_path(records, step).parent else []
            _git_commit([record_path(records, step), *kept],
                        f"{label}: AutoAttack re-measured with the reference code and torchattacks on the same weights")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("run", "list", "_step"):
        p = sub.add_parser(name)
        if name == "_step":  # the child process of one step
            p.add_argument("suite")
            p.add_argument("run_id")
            p.add_argument("phase", choices=PHASES)
        p.add_argument("--data-dir", default="data", help="folder holding MNIST/raw and the CIFAR-10 copy")
        p.add_argument("--records", type=Path, default=RECORDS)
        p.add_argument("--runs", type=Path, default=RUNS)
        p.add_argument("--suites", nargs="*", default=list(SUITES), help=f"default: {' '.join(SUITES)}")
        p.add_argument("--rows", nargs="*", default=list(ROWS), help=f"default: {' '.join(ROWS)}")
        p.add_argument("--phases", nargs="*", choices=PHASES, default=list(PHASES), help="default: all, in order")
        p.add_argument("--commit", action="store_true", help="git-commit each row's record (and kept weights) "
                       "when a step finishes")
    args = parser.parse_args(argv)
    records, runs = args.records.resolve(), args.runs.resolve()  # a fit changes the working folder
    all_suites = suites(str(Path(args.data_dir).resolve()))
    unknown = sorted(set(args.suites) - set(all_suites))
    if unknown:
        parser.error(f"--suites must name suites of reproduce.py ({sorted(all_suites)}), got {unknown}")
    if args.cmd == "_step":
        suite = all_suites[args.suite]
        run = next((r for r in suite.rows if r.run_id == args.run_id), None)
        if run is None:
            parser.error(f"run_id must be one of {[r.run_id for r in suite.rows]}, got {args.run_id!r}")
        run_step(Step(suite, run, args.phase), records, runs)
        return
    steps = plan(all_suites, tuple(args.suites), tuple(args.rows), tuple(args.phases))
    if args.cmd == "list":
        for step in steps:
            state = "done" if done(records, step) else "todo"
            what = ", ".join(f"{i} {v} on {b} test batches" for i, v, b in step.evaluations)
            print(f"{state}  {step.suite.name}/{step.run.run_id}  {step.phase}: {what}")
        return
    run_plan(steps, records, runs, str(Path(args.data_dir).resolve()), args.commit)


if __name__ == "__main__":
    main()
