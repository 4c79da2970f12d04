"""Profiles a robust run with :class:`StabilityProfile` on one process or on two ``ddp_spawn`` (gloo) ranks and
writes the profile to ``<out>/profile_devices<d>.json`` and a checkpoint after step 3 to ``<out>/ckpt<d>/``. Not a
test module: ``test_stability.py`` runs it as a subprocess (``python tests/ddp_stability_run.py OUT DEVICES``).

The learning rate is 0 and PGD has no random start, so whether a sample's adversarial example is misclassified
depends on the sample alone: two ranks that each see half of every epoch must end with the counts of one process.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import lightning as L
import torch
from conftest import TinyNet
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_advsel import AdversarialSelectionModule, AttackConfig
from lightning_advsel.callbacks import StabilityProfile
from lightning_advsel.data import DigitsDataModule

BATCH, CKPT_STEP = 64, 3


def pretrained(data: DigitsDataModule) -> TinyNet:
    """A TinyNet fitted on clean digits, so that the attack leaves some samples correctly classified."""
    torch.manual_seed(0)
    net = TinyNet()
    x, y = data.train_set.tensors
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(50):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net


def run(out: str, devices: int) -> None:
    data = DigitsDataModule(batch_size=BATCH, return_index=True)
    data.setup()
    module = AdversarialSelectionModule(
        pretrained(data), recipe="robust", p_up=1.0, optimizer=functools.partial(torch.optim.SGD, lr=0.0),
        train_attack=AttackConfig(eps=0.1, alpha=0.05, steps=2, random_start=False, mode="train"))
    callbacks = [StabilityProfile(path=str(Path(out) / f"profile_devices{devices}.json")),
                 ModelCheckpoint(dirpath=Path(out) / f"ckpt{devices}", filename="{step}",
                                 every_n_train_steps=CKPT_STEP, save_top_k=-1)]
    trainer = L.Trainer(default_root_dir=out, max_epochs=2, accelerator="cpu", devices=devices,
                        strategy="ddp_spawn" if devices > 1 else "auto", logger=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, data)


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]))
