"""Run by tests as ``python tests/ddp_eval_worker.py OUT_DIR``: ``trainer.test`` under AutoAttack on 2 CPU ranks.

Each rank writes ``OUT_DIR/rank{r}.json``: the data set rows its test batches held, how many of them the
AutoAttack test attack left correctly classified (recomputed on the rank's own batches) and the logged
``test/acc_robust``. Lightning relaunches this script once per rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from autoattack_budget import cut_reference_budget
from conftest import TinyNet, tiny_batch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from lightning_advsel import AdversarialSelectionModule, AutoAttackConfig

ROWS = 32
ATTACK = AutoAttackConfig(eps=0.03, version="apgd")  # L-inf, pixels: small enough that some rows stay robust


class Batches(L.Callback):
    """Keeps every test batch this rank saw."""

    def __init__(self) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        self.batches.append(tuple(t.clone() for t in batch))


def main() -> None:
    cut_reference_budget()
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    net = TinyNet().eval()
    x, _ = tiny_batch(ROWS)
    with torch.no_grad():
        y = net(x).argmax(1)  # labels the model predicts: every row is correct clean, margins vary
    module = AdversarialSelectionModule(net, recipe="standard", test_attack=ATTACK)
    seen = Batches()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"),
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[seen], default_root_dir=out)
    trainer.test(module, DataLoader(TensorDataset(x, y, torch.arange(ROWS)), batch_size=8), verbose=False)
    robust = 0
    for batch_idx, (xb, yb, _) in enumerate(seen.batches):
        with torch.no_grad():
            robust += int((net(ATTACK(net, xb, yb, batch_idx=batch_idx, num_classes=10)).argmax(1) == yb).sum())
    result = {"rows": [int(i) for _, _, idx in seen.batches for i in idx], "robust": robust,
              "acc_robust": float(trainer.callback_metrics["test/acc_robust"])}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
