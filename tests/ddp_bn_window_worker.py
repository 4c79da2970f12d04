"""``run(OUT_DIR)``, called by ``tests/ddp_worker.py`` for its ``bn_window`` run: 2 CPU ranks train a BatchNorm network
with ``accumulate_grad_batches=2`` and a validation after every training batch, so that every other validation
falls inside an accumulation window (after a backward under DDP's ``no_sync``), then test it.

Each rank writes ``OUT_DIR/bn_window.rank{r}.json``: per validation and for the test, the BatchNorm running mean
the rank evaluated with and whether an accumulation window was open; and the last validation's and the test's
clean loss as the rank logged them (each rank evaluates half of the held-out rows).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from conftest import TinyNet, tiny_batch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from lightning_advsel import AdversarialSelectionModule, AttackConfig


class RunningStats(L.Callback):
    """The BatchNorm running mean after the first batch of every validation and test (DDP syncs buffers, when it
    does, before that batch's forward), and whether an accumulation window was open."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx,  # noqa: ANN001
                                dataloader_idx=0) -> None:
        if batch_idx == 0:
            self.seen.append({"stage": trainer.state.stage.value,
                              "running_mean": module.model.net[1].running_mean.tolist(),
                              "window_open": module.batches_trained % module.accumulate_grad_batches != 0})

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        self.on_validation_batch_end(trainer, module, outputs, batch, batch_idx, dataloader_idx)


def run(out: Path) -> None:
    torch.manual_seed(0)
    x, y = tiny_batch(32)
    module = AdversarialSelectionModule(
        TinyNet(batchnorm=True), recipe="robust", accumulate_grad_batches=2, eval_attack=None,
        train_attack=AttackConfig(eps=0.1, alpha=0.05, steps=1, mode="eval"),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    stats = RunningStats()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"),
                        max_epochs=1, val_check_interval=1, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[stats], default_root_dir=out)
    held_out = DataLoader(TensorDataset(x[:8], y[:8]), batch_size=4)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4), held_out)
    losses = {"val": float(trainer.callback_metrics["val/loss_clean"])}
    trainer.test(module, held_out, verbose=False)
    losses["test"] = float(trainer.callback_metrics["test/loss_clean"])
    (out / f"bn_window.rank{trainer.global_rank}.json").write_text(json.dumps({"seen": stats.seen,
                                                                              "loss_clean": losses}))
