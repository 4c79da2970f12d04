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
from conftest import MAIN_JOB, REPO, config_args

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


# TRADES keeps a state of its own per step (the attack's clean target) and the radius warm-up (5 epochs) lasts the
# whole run, so the resumed half must continue its ramp: one run with both covers the main job's path as well.
OVERLAYS = ("objectives/trades.yaml", "schedules/eps_warmup.yaml")


def command(cfg: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lightning_advsel.cli", "fit", *config_args(*MAIN_JOB, *OVERLAYS),
            "--config", str(cfg), *extra]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}


def run(args: list[str], cwd: Path) -> None:
    result = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=240, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]


def test_sigkill_mid_epoch_then_resume_from_last_gives_the_uninterrupted_weights(tmp_path):
    # The uninterrupted run goes on beside the one to be killed (separate folders; start-up is most of each).
    straight_run = subprocess.Popen(command(config(tmp_path, "straight", pause=False)), env=env(),
                                    cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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
    _, straight_err = straight_run.communicate(timeout=240)
    assert straight_run.returncode == 0, straight_err[-3000:]

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
    # The cost totals continue from the checkpoint: the resumed run counts every step once, as the straight one
    # (ds with TRADES at PGD-2 on 64-row batches: every row attacked, one no-grad forward of the 64 rows for the
    # attack's target, the 64 pairs scored (128 rows), and the 32 selected pairs trained on (64 rows)).
    steps = 2 * STEPS_PER_EPOCH
    assert resumed["advsel"]["work"] == straight["advsel"]["work"]
    assert straight["advsel"]["work"]["attack_grad_steps"] == steps * 64 * 2
    assert straight["advsel"]["work"]["forward_rows"] == steps * (64 + 128 + 64)


def test_train_order_is_a_function_of_seed_and_epoch_and_a_resume_skips_the_consumed_batches():
    from lightning_advsel.data import DigitsDataModule

    def order(dm: DigitsDataModule, epoch: int) -> list[int]:
        sampler = dm.train_dataloader().sampler
        sampler.set_epoch(epoch)
        return list(sampler)

    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    first, second = order(dm, 0), order(dm, 1)
    assert sorted(first) == list(range(len(dm.train_set))) and first != second
    again = DigitsDataModule(batch_size=64)
    again.setup()
    assert order(again, 0) == first
    again.load_state_dict({"epoch": 0, "batches": 3})
    loader = again.train_dataloader()
    loader.sampler.set_epoch(0)
    assert list(loader.sampler) == first[3 * 64:]
    loader.sampler.set_epoch(1)  # the skip applies to the interrupted epoch only
    assert list(loader.sampler) == second


def test_ranks_split_one_epoch_into_disjoint_equal_shares():
    from torch.utils.data import TensorDataset

    from lightning_advsel.data import ResumableSampler

    data = TensorDataset(torch.arange(10))
    shares = [list(ResumableSampler(data, 2, rank, seed=0)) for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 5
    assert sorted(shares[0] + shares[1]) == list(range(10))


def test_selection_statistics_of_an_unfinished_epoch_survive_a_checkpoint(tmp_path):
    import lightning as L
    from conftest import TinyNet, tiny_batch
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_advsel import AdversarialSelectionModule

    def states(module: AdversarialSelectionModule) -> dict:  # two epoch accumulators, named as the checkpoint does
        kept = module.metric_groups.train_group.state()
        return {name: kept[name] for name in ("train_acc", "train_adv_frac")}

    class SaveAtStep2(L.Callback):
        states: dict = {}

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            if trainer.global_step == 2:
                trainer.save_checkpoint(tmp_path / "mid.ckpt")
                self.states = {**states(module), "work": {k: v.clone() for k, v in module.work.metric_state.items()}}

    module = AdversarialSelectionModule(TinyNet(), recipe="ds", p_up=0.5)
    x, y = tiny_batch(32)
    saver = SaveAtStep2()
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[saver])
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))  # saves after 2 of 4 batches
    loaded = AdversarialSelectionModule.load_from_checkpoint(tmp_path / "mid.ckpt", model=TinyNet())
    restored = {**states(loaded), "work": loaded.work.metric_state}
    for name, saved in saver.states.items():
        assert any(bool(v.abs().sum()) for v in saved.values())
        for key, value in saved.items():
            assert torch.equal(restored[name][key], value), (name, key)
