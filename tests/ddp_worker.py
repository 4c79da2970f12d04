"""Run by tests as ``python tests/ddp_worker.py OUT.json SCOPE:P_UP:STEPS ...``: two-process DDP on CPU (gloo).

For each ``SCOPE:P_UP:STEPS`` it trains a fresh copy of the deterministic test setup and writes, per rank,
the final parameters, the rows each step selected and how many times DDP's gradient all-reduce (its
communication hook) fired. Lightning relaunches this script once per rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from conftest import TinyNet, tiny_batch
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.utils.data import DataLoader, TensorDataset

from lightning_advsel import AdversarialSelectionModule, AttackConfig
from lightning_advsel import step as step_module

ATTACK = AttackConfig(eps=0.1, alpha=0.05, steps=2, random_start=False, mode="train")
ROWS = 16  # the global batch: 8 rows per rank


def build(scope: str, p_up: float, nonfinite: str = "raise") -> AdversarialSelectionModule:
    torch.manual_seed(0)
    return AdversarialSelectionModule(TinyNet(), recipe="ds", p_up=p_up, train_attack=ATTACK,
                                      optimizer=lambda p: torch.optim.SGD(p, lr=0.1), selection_scope=scope,
                                      nonfinite=nonfinite)


class SelectionLog(L.Callback):
    """Records the selected rows of every step, counts DDP's gradient all-reduces (one bucket here) and the
    collectives (all-reduces and barriers) each step makes before its attack starts and, besides the gradient
    all-reduce, after it."""

    def __init__(self) -> None:
        self.rows: list[list[int]] = []
        self.allreduce_calls = 0
        self.collectives_before_attack: list[int] = []
        self.collectives_after_attack: list[int] = []
        self._collectives = 0
        self._buckets = 0

    def on_train_start(self, trainer, module) -> None:  # noqa: ANN001
        def counting_hook(state, bucket):  # noqa: ANN001
            self.allreduce_calls += 1
            self._buckets += 1
            return allreduce_hook(state, bucket)

        trainer.strategy.model.register_comm_hook(state=None, hook=counting_hook)

        def counted(fn):  # noqa: ANN001, ANN202
            def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                self._collectives += 1
                return fn(*args, **kwargs)
            return call

        def attack(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.collectives_before_attack.append(self._collectives)
            return run_attack(*args, **kwargs)

        run_attack = step_module.attack
        self._originals = (run_attack, torch.distributed.all_reduce, torch.distributed.barrier)
        step_module.attack = attack
        torch.distributed.all_reduce = counted(torch.distributed.all_reduce)
        torch.distributed.barrier = counted(torch.distributed.barrier)

    def on_train_end(self, trainer, module) -> None:  # noqa: ANN001
        step_module.attack, torch.distributed.all_reduce, torch.distributed.barrier = self._originals

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:  # noqa: ANN001
        self._collectives = self._buckets = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if outputs is None:  # a skipped step
            self.rows.append([])
            return
        self.collectives_after_attack.append(self._collectives - self._buckets - self.collectives_before_attack[-1])
        # Name each selected pool row by its single-process pool row: dataset index, + ROWS if adversarial.
        x_all, _ = tiny_batch(ROWS)
        index = torch.cdist(batch[0].flatten(1), x_all.flatten(1)).argmin(1)
        pool_index = torch.cat([index, index + ROWS])
        self.rows.append(pool_index[module.last_selection.selected].tolist())


def main() -> None:
    out = Path(sys.argv[1])
    x, y = tiny_batch(ROWS)
    results = {}
    for run in sys.argv[2:]:
        # SCOPE:P_UP:STEPS, or SCOPE:P_UP:STEPS:nan for one NaN pixel in one row of the data set, which
        # only one rank sees (two batches per rank per epoch, max_epochs=1).
        scope, p_up, steps, *fault = run.split(":")
        p_up, steps = float(p_up), int(steps)
        module = build(scope, p_up, "skip" if fault else "raise")
        data_x = x.clone()
        if fault:
            data_x = torch.cat([x, x])
            data_x[5, 0, 3, 3] = float("nan")
        log = SelectionLog()
        trainer = L.Trainer(
            accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"),
            max_steps=steps, max_epochs=1 if fault else None, limit_val_batches=0, logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[log],
            default_root_dir=out.parent,
        )
        loader = DataLoader(TensorDataset(data_x, y.repeat(len(data_x) // ROWS)), batch_size=ROWS // 2,
                            shuffle=False)
        trainer.fit(module, loader)
        results[run] = {
            "params": [p.detach().tolist() for p in module.model.parameters()],
            "selected": log.rows,
            "allreduce_calls": log.allreduce_calls,
            "collectives_before_attack": log.collectives_before_attack,
            "collectives_after_attack": log.collectives_after_attack,
            "optimizer_steps": trainer.global_step,
            "skipped_steps": module.skipped_steps,
        }
    rank = trainer.global_rank
    out.with_name(f"{out.stem}.rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
