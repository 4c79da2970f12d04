"""Run by tests as ``python tests/ddp_worker.py OUT.json SCOPE:P_UP:STEPS[:nan][:accN] ... [bn_window]``: two-process
DDP on CPU (gloo).

For each run it trains a fresh copy of the deterministic test setup and writes, per rank, the final parameters,
the rows each step selected and how many times DDP's gradient all-reduce (its communication hook) fired.
``nan`` puts one NaN pixel in the data; ``accN`` accumulates gradients over N batches of 2 rows per rank and
saves a checkpoint after the first batch (inside a window) as ``OUT_DIR/<run with _ for :>.ckpt``.
``bn_window`` (last) runs ``ddp_bn_window_worker.run`` in OUT.json's folder. Lightning relaunches this script once
per rank.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import ddp_bn_window_worker
import lightning as L
import torch
from conftest import TinyNet, tiny_batch
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_advsel import AdversarialSelectionModule, AttackConfig
from lightning_advsel import step as step_module
from lightning_advsel.attack_compilation import AttackCompilation

ATTACK = AttackConfig(eps=0.1, alpha=0.05, steps=2, random_start=False, mode="train")
ROWS = 16  # the global batch: 8 rows per rank
SAMPLER_SEED = 0  # Lightning shuffles a training set across ranks with a DistributedSampler of this seed


def rank_rows(n: int, rank: int) -> list[int]:
    """The data set rows rank ``rank`` of 2 trains on in epoch 0, in order (Lightning's DistributedSampler)."""
    return list(DistributedSampler(range(n), num_replicas=2, rank=rank, shuffle=True, seed=SAMPLER_SEED))


def build(scope: str, p_up: float, nonfinite: str = "raise", accumulate: int = 1,
          compile_attack: bool = False) -> AdversarialSelectionModule:
    torch.manual_seed(0)
    return AdversarialSelectionModule(TinyNet(), recipe="ds", p_up=p_up, train_attack=ATTACK,
                                      optimizer=lambda p: torch.optim.SGD(p, lr=0.1), selection_scope=scope,
                                      nonfinite=nonfinite, accumulate_grad_batches=accumulate,
                                      compile_attack=compile_attack)


class SaveAfterFirstBatch(L.Callback):
    """Saves a checkpoint after the first training batch (every rank calls it; rank 0 writes)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.current_epoch == 0 and batch_idx == 0:
            trainer.save_checkpoint(self.path)


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
    os.environ["PL_GLOBAL_SEED"] = str(SAMPLER_SEED)  # what Lightning seeds its sampler with (set before launch)
    out = Path(sys.argv[1])
    x, y = tiny_batch(ROWS)
    runs = sys.argv[2:]
    results = {}
    for run in (r for r in runs if r != "bn_window"):
        # SCOPE:P_UP:STEPS, then options: nan for one NaN pixel in one row of the data set, which only one rank
        # sees (max_epochs=1), accN for accumulation over N batches, compiled for the module's compile_attack
        # (with the cheap aot_eager backend: the graph is the same, CPU code generation would only cost time).
        scope, p_up, steps, *options = run.split(":")
        p_up, steps = float(p_up), int(steps)
        fault = "nan" in options
        accumulate = next((int(o[3:]) for o in options if o.startswith("acc")), 1)
        AttackCompilation.backend = "aot_eager"
        module = build(scope, p_up, "skip" if fault else "raise", accumulate, compile_attack="compiled" in options)
        data_x = x.clone()
        if fault:
            data_x = torch.cat([x, x])
            # Under accumulation: a row of rank 1's second batch, the closing batch of the first window.
            data_x[5 if accumulate == 1 else rank_rows(len(data_x), 1)[2], 0, 3, 3] = float("nan")
        log = SelectionLog()
        callbacks = [log]
        if accumulate > 1:
            callbacks.append(SaveAfterFirstBatch(out.parent / f"{run.replace(':', '_')}.ckpt"))
        trainer = L.Trainer(
            accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"),
            max_steps=steps, max_epochs=1 if fault else None, limit_val_batches=0, logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
            default_root_dir=out.parent,
        )
        loader = DataLoader(TensorDataset(data_x, y.repeat(len(data_x) // ROWS)),
                            batch_size=ROWS // 2 if accumulate == 1 else 2, shuffle=False)
        trainer.fit(module, loader)
        results[run] = {
            "params": [p.detach().tolist() for p in module.model.parameters()],
            "selected": log.rows,
            "allreduce_calls": log.allreduce_calls,
            "collectives_before_attack": log.collectives_before_attack,
            "collectives_after_attack": log.collectives_after_attack,
            "optimizer_steps": trainer.global_step,
            "skipped_steps": module.skipped_steps,
            "batches_trained": module.batches_trained,
            # The compiled attack's graph calls and eager fallbacks (none without compile_attack).
            "attack_graph_calls": getattr(module.attack_compilation.train, "graph_calls", 0),
            "attack_eager_calls": getattr(module.attack_compilation.train, "eager_calls", 0),
        }
    if results:  # not when bn_window is the only run
        out.with_name(f"{out.stem}.rank{trainer.global_rank}.json").write_text(json.dumps(results))
    if "bn_window" in runs:
        ddp_bn_window_worker.run(out.parent)


if __name__ == "__main__":
    main()
