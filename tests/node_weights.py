"""A callback for the multi-node test: every rank saves its final weights and where it ran."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class SaveWeights(L.Callback):
    """When fitting ends, each rank writes ``<dirpath>/rank{global rank}.pt``: its node rank, world size and state."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save({"node_rank": trainer.node_rank, "world_size": trainer.world_size,
                    "state_dict": pl_module.state_dict()}, self.dirpath / f"rank{trainer.global_rank}.pt")
