"""SIGKILL mid-epoch, restart with ``--ckpt_path last``: the run ends where an uninterrupted one ends.

Real subprocesses and a real ``SIGKILL`` from outside. On CPU with a fixed seed the final weights,
optimizer and scheduler state are bit-identical to an uninterrupted run: every random draw of a training
step comes from a generator seeded by (seed, step, rank), the data order is a function of (seed, epoch) and
the data module skips the batches consumed before the checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO

pytestmark = pytest.mark.slow
STEPS_PER_EPOCH = 6
KILL_AT = 5  # after the checkpoint of step 4 and before the one of step 6: mid-epoch, one update lost


def config(tmp_path: Path, name: str, pause: bool) -> Path:
    callbacks = f"""
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        dirpath: {tmp_path / name}
        every_n_train_steps: 2       # optimizer steps
        save_last: true"""
    if pause:
        callbacks += f"""
    - class_path: pause_callback.PauseAt
      init_args:
        step: {KILL_AT}
        marker: {tmp_path / "paused"}"""
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""trainer:
  logger: false
  max_epochs: 2
  limit_train_batches: {STEPS_PER_EPOCH}
  limit_val_batches: 1
  num_sanity_val_steps: 0
  enable_progress_bar: false
  callbacks:{callbacks}
model:
  init_args:
    train_attack:
      steps: 2
    eval_attack:
      steps: 1
""")
    return path


def command(cfg: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lightning_advsel.cli", "fit", "--config", str(REPO / "configs" / "digits_ds.yaml"),
            "--config", str(cfg), *extra]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}


def run(args: list[str], cwd: Path) -> None:
    result = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=240, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]


def test_sigkill_mid_epoch_then_resume_from_last_gives_the_uninterrupted_weights(tmp_path):
    run(command(config(tmp_path, "straight", pause=False)), tmp_path)

    killed_cfg = config(tmp_path, "killed", pause=True)
    proc = subprocess.Popen(command(killed_cfg), env=env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = tmp_path / "paused"
    deadline = time.monotonic() + 180
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "the run never reached the kill point"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    before = torch.load(tmp_path / "killed" / "last.ckpt", weights_only=True)
    assert before["global_step"] == 4 and before["epoch"] == 0  # mid-epoch: 4 of 6 batches

    # Restart without the pause, from `last`, writing into the same checkpoint folder.
    run(command(config(tmp_path, "killed", pause=False), "--ckpt_path", "last"), tmp_path)

    straight = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "killed" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == straight["global_step"] == 2 * STEPS_PER_EPOCH
    for key, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    for a, b in zip(straight["optimizer_states"][0]["state"].values(),
                    resumed["optimizer_states"][0]["state"].values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["lr_schedulers"] == straight["lr_schedulers"]
    assert resumed["advsel"]["p_up"] == straight["advsel"]["p_up"]
    assert resumed["advsel"]["skipped_steps"] == straight["advsel"]["skipped_steps"] == 0
