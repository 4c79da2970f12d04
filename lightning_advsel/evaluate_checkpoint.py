"""Robust accuracy of a trained model under AutoAttack, as a JSON report that survives a kill.

:func:`evaluate_autoattack` attacks a model's test batches one after another and appends each finished batch's
counts to ``OUT.partial`` (one JSON line, flushed to disk), beside the report ``OUT``. A rerun with the same
settings reads that file and attacks only the batches it lacks. Each batch is attacked with the seed
``batch_seed(seed, batch_idx)`` whatever ran before it, so a resumed report equals an uninterrupted one (all but
its ``seconds``). When every batch is done the report is written (to a temporary file, then renamed) and the
partial file removed; a rerun then only reads the report back.

A rerun never loses what an earlier one saved: a report or partial file of other settings (another checkpoint,
attack, library version, batch count or device) is refused before any work, and so is a finished batch whose
images or labels differ from those it was computed on.

``lightning-advsel evaluate`` (``evaluate_checkpoint`` of the command line's module) runs it on a checkpoint and a
data module's test set.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_advsel.checks import check_int, check_path
from lightning_advsel.evaluation import AutoAttackConfig, check_classes, library, stage_settings

# What a rerun must share with the run it resumes or reads back.
SETTINGS = ("checkpoint_sha256", "eps", "norm", "version", "seed", "implementation", "library", "num_classes",
            "batch_limit", "device")
PARTIAL_SUFFIX = ".partial"


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _data_sha256(x: Tensor, y: Tensor) -> str:
    digest = hashlib.sha256()
    for t in (x, y):
        digest.update(str((t.dtype, tuple(t.shape))).encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _mismatch(found: dict[str, Any], settings: dict[str, Any]) -> str:
    return ", ".join(f"{key}={found.get(key)!r} (asked: {settings[key]!r})" for key in SETTINGS
                     if found.get(key) != settings[key])


def _read_report(out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The finished report at ``out`` if it has ``settings``; ``None`` if there is none; else a clear error."""
    if not out.exists():
        return None
    try:
        report = json.loads(out.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"`out` {str(out)!r} exists and is not a report of this command ({err}); choose another "
                         f"`out`, or move that file away") from err
    different = _mismatch(report, settings) if isinstance(report, dict) else "not a JSON object"
    if different:
        raise ValueError(f"`out` {str(out)!r} holds a finished evaluation of other settings: {different}; choose "
                         f"another `out`, or move that file away to evaluate again")
    return report


def _read_partial(partial: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The finished batches that ``partial`` holds for ``settings`` (none if it does not exist); the file is
    rewritten without a last line cut short by a kill. A file of other settings is a clear error."""
    if not partial.exists():
        return []
    lines = partial.read_text().splitlines()
    try:
        header = json.loads(lines[0])
    except (IndexError, ValueError) as err:
        raise ValueError(f"{str(partial)!r} is not the partial results of this command ({err}); move it away to "
                         f"evaluate again") from err
    different = _mismatch(header, settings)
    if different:
        raise ValueError(f"{str(partial)!r} holds partial results of other settings: {different}; choose another "
                         f"`out`, or move that file away to evaluate again")
    done = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            done.append(json.loads(line))
        except ValueError as err:
            if number < len(lines):  # only the last line can have been cut short
                raise ValueError(f"{str(partial)!r} line {number} is damaged ({err}); move the file away to "
                                 f"evaluate again") from err
            _write_atomically(partial, "".join(json.dumps(entry) + "\n" for entry in [header, *done]))
    return done


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _append(partial: Path, entry: dict[str, Any]) -> None:
    with open(partial, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _summary(done: list[dict[str, Any]], stages: list[str]) -> dict[str, Any]:
    images = sum(entry["images"] for entry in done)
    after = {stage: sum(entry["robust_after"][stage] for entry in done) / max(images, 1) for stage in stages}
    return {"images": images, "clean": sum(entry["clean"] for entry in done) / max(images, 1),
            "robust": after[stages[-1]] if images else 0.0, "robust_after": after}


def evaluate_autoattack(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    attack: AutoAttackConfig,
    out: str | os.PathLike,
    *,
    num_classes: int,
    total_batches: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Clean and AutoAttack accuracy of ``model`` over ``batches``, written to the JSON report ``out``; resumable.

    Args:
        model: classifier taking inputs in [0, 1] and returning ``(B, num_classes)`` logits, on the batches'
            device.
        batches: ``(x, y)`` pairs, pixels in [0, 1] and integer labels, in the same order on every run (a test
            loader without shuffling).
        attack: the AutoAttack settings; batch ``i`` is attacked with the seed ``batch_seed(attack.seed, i)``.
        out: the report's path; ``out + ".partial"`` holds the finished batches until the report is written.
        num_classes: classes of the model's output.
        total_batches: how many of ``batches`` to evaluate (all when ``None``); also the progress bar's length.
        checkpoint: the file the weights came from: its SHA-256 goes into the report and ties a rerun to it.
        progress: show a progress bar (on stderr).

    Returns:
        The report: the settings (``checkpoint``, ``checkpoint_sha256``, ``eps``, ``norm``, ``version``, ``seed``,
        ``implementation``, ``library``, ``num_classes``, ``batch_limit``, ``device``), the ``attack`` in words and
        its ``stages`` (iterations, restarts, targets), ``images``, ``clean`` and ``robust`` accuracy, the
        accuracy after each stage (``robust_after``), one entry of counts per batch (``batches``) and the
        ``seconds`` the attacks took.

    Raises:
        ValueError: before any attack, for a report or partial results at ``out`` of other settings, a finished
            batch whose data changed, a bad ``out``, ``total_batches`` or ``num_classes``, or a ``checkpoint``
            that is not a file.
    """
    if not isinstance(attack, AutoAttackConfig):
        raise ValueError(f"`attack` must be an AutoAttackConfig, got {type(attack).__name__}")
    out = Path(check_path("out", out, "a file path"))
    if out.is_dir():
        raise ValueError(f"`out` must be a file path, got the folder {str(out)!r}")
    check_int("total_batches", total_batches, 0, optional=True)
    check_classes(attack.version, num_classes)
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ValueError(f"`checkpoint` must be a file, got {str(checkpoint)!r}")
    device = next(model.parameters(), torch.empty(0)).device.type
    settings = {"checkpoint_sha256": file_sha256(checkpoint) if checkpoint is not None else None, **asdict(attack),
                "library": library(attack.implementation),
                "num_classes": num_classes, "batch_limit": total_batches, "device": device}
    report = _read_report(out, settings)
    if report is not None:
        print(f"{out}: finished earlier, {report['images']} images: clean {report['clean']:.4f}, robust "
              f"{report['robust']:.4f} ({report['attack']})", flush=True)
        return report
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    done = _read_partial(partial, settings)
    if not done:
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(partial, json.dumps(settings) + "\n")
    finished = {entry["batch"]: entry for entry in done}
    stages = list(stage_settings(attack.implementation, attack.version, num_classes))
    bar = tqdm(total=total_batches, initial=len(finished), unit="batch", disable=not progress,
               desc=f"AutoAttack {attack.version} ({attack.implementation})")
    if finished:
        bar.write(f"resuming from {partial}: {len(finished)} batches done")
    try:
        for batch_idx, (x, y) in enumerate(batches):
            if total_batches is not None and batch_idx >= total_batches:
                break
            data = _data_sha256(x, y)
            if batch_idx in finished:
                if finished[batch_idx]["data_sha256"] != data:
                    raise ValueError(f"test batch {batch_idx} differs from the one whose results {str(partial)!r} "
                                     f"holds (the data set or its order changed); move that file away to evaluate "
                                     f"again")
                continue
            start = time.perf_counter()
            result = attack.stages(model, x, y, batch_idx=batch_idx, num_classes=num_classes)
            entry = {"batch": batch_idx, "images": int(y.shape[0]), "clean": int(result.clean.sum()),
                     "robust_after": {stage: int(flags.sum()) for stage, flags in result.robust_after.items()},
                     "data_sha256": data, "seconds": time.perf_counter() - start}
            _append(partial, entry)
            finished[batch_idx] = entry
            summary = _summary(list(finished.values()), stages)
            bar.set_postfix(clean=f"{summary['clean']:.2%}", robust=f"{summary['robust']:.2%}")
            bar.update()
    finally:
        bar.close()
    done = [finished[i] for i in sorted(finished)]
    report = {**settings, "checkpoint": None if checkpoint is None else str(checkpoint), "attack": attack.describe(),
              "stages": stage_settings(attack.implementation, attack.version, num_classes), **_summary(done, stages),
              "batches": done, "seconds": sum(entry["seconds"] for entry in done)}
    _write_atomically(out, json.dumps(report, indent=1) + "\n")
    partial.unlink()
    print(f"{out}: {report['images']} images: clean {report['clean']:.4f}, robust {report['robust']:.4f} "
          f"({report['attack']})", flush=True)
    return report
