"""Shared fixtures: tiny models and data, and a one-call way to run training steps through a Trainer."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MAIN_JOB = ("digits/base.yaml", "recipes/ds.yaml", "callbacks/dashboards.yaml")  # the README's main job


def config_args(*names: str) -> list[str]:
    """``--config`` arguments for files under ``configs/``, combined in the order given."""
    return [arg for name in names for arg in ("--config", str(REPO / "configs" / name))]


def digits(recipe: str) -> list[str]:
    """``--config`` arguments of the digits base with ``configs/recipes/<recipe>.yaml``."""
    return config_args("digits/base.yaml", f"recipes/{recipe}.yaml")


class NearUniform(nn.Module):
    """Ten classes whose logits differ by little. The true class 0 leads class 1 by 0.05, which rises with the
    first pixel; classes 2-9 trail by 0.5 and fall with it. The cross-entropy's gradient is dominated by the
    eight trailing classes and lowers that pixel; the margin's follows class 1 and raises it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1)[:, 0] - 0.5
        return torch.stack([torch.zeros_like(z), z - 0.05, *[-z - 0.5] * 8], dim=1)


class TinyNet(nn.Module):
    """A 2-layer MLP on 1x8x8 inputs: fast, deterministic, and with a final nn.Linear."""

    def __init__(self, num_classes: int = 10, batchnorm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        if batchnorm:
            layers.append(nn.BatchNorm1d(64))
        layers += [nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def tiny_batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def fit_steps(module: L.LightningModule, x: torch.Tensor, y: torch.Tensor, tmp_path: Path, steps: int = 1,
              **trainer_kwargs) -> L.Trainer:
    """Run ``steps`` training steps of ``module`` on the fixed batch ``(x, y)`` (no shuffle, no validation)."""
    loader = DataLoader(TensorDataset(x, y), batch_size=x.shape[0], shuffle=False)
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1, **trainer_kwargs,
    )
    trainer.fit(module, loader)
    return trainer


def rank_errors(output: str, lines: int = 30) -> str:
    """The end of each rank's own output (torch prefixes a rank's error lines with ``[rankN]:``) and of the rest:
    a failed multi-process run shows which rank failed first and with what, not only the launcher's last words."""
    tagged: dict[str, list[str]] = {}
    for line in output.splitlines():
        match = re.match(r"\[(rank\d+)\]:", line)
        tagged.setdefault(match.group(1) if match else "untagged", []).append(line)
    return "\n".join(f"--- {who}, last {lines} lines ---\n" + "\n".join(text[-lines:])
                     for who, text in sorted(tagged.items()))


def run_ranks(args: list[str], cwd: Path, timeout_s: int, what: str) -> str:
    """Run a multi-process command (its stdout and stderr together) and return its output; fail the test, with
    each rank's error, if it exits non-zero or has not finished in ``timeout_s`` seconds (then it is killed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    # A new session, so that a hung run is killed with the ranks it started, not only the parent.
    proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{what} did not finish in {timeout_s} s (killed):\n{rank_errors(output)}")
    if proc.returncode != 0:
        pytest.fail(f"{what} exited with status {proc.returncode}:\n{rank_errors(output)}")
    return output


def run_spawned_script(script: str, out: Path, devices: int, timeout_s: int = 180) -> None:
    """Run ``tests/<script> OUT DEVICES`` in a subprocess (a ``ddp_spawn`` run); fail the test if it fails or hangs."""
    run_ranks([sys.executable, str(REPO / "tests" / script), str(out), str(devices)], out, timeout_s,
              f"{devices}-rank ddp_spawn run of {script}")


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return tiny_batch()
