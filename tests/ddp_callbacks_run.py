"""Fits a tiny DS run with the callbacks, on one process or on two ``ddp_spawn`` (gloo) ranks, and writes what
each rank's callbacks saw to ``<out>/rank<r>_devices<d>.json``. Not a test module: ``test_callbacks_ddp.py``
runs it as a subprocess (``python tests/ddp_callbacks_run.py OUT DEVICES``) so a hung spawn is killed.

The learning rate is 0 and PGD has no random start, so every step's selection depends on the batch alone: two
ranks with batches from a ``DistributedSampler`` and one process that sees the same batches in turn must log
the same sums.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from conftest import TinyNet, tiny_batch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_advsel import AdversarialSelectionModule, AttackConfig
from lightning_advsel.callbacks import AdaptivePUp, MinimumPerturbation, SelectionMakeup, minimum_adversarial_pool

N_TRAIN, N_VAL, BATCH, PROBE, WORLD = 48, 20, 8, 15, 2


class RankStride(Sampler):
    """Rank ``r`` of ``W`` reads samples ``r, r + W, ...`` in order (Lightning's own sampler would shuffle)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def _rank_world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __iter__(self):
        rank, world = self._rank_world()
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        rank, world = self._rank_world()
        return len(range(rank, self.n, world))


class DumpRank(Callback):
    """Writes the other callbacks' records and the final metrics of this rank as JSON."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        adaptive, makeup, probe = (next(c for c in trainer.callbacks if isinstance(c, t))
                                   for t in (AdaptivePUp, SelectionMakeup, MinimumPerturbation))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        # This rank's own Fig. 8 pool of its last batch (the learning rate is 0: the weights of the last
        # measurement), for the test to sum over ranks.
        x, y = probe._last_batch
        pool = minimum_adversarial_pool(pl_module.model, x, y, probe.radii, pl_module.p_up, norm=probe.norm,
                                        steps=probe.steps, step_factor=probe.step_factor, mode=probe.mode,
                                        scoring_mode=pl_module.settings.scoring_mode)
        local = {"train_rows": y.numel(), "pool_size": pool.loss.numel(), "selected": pool.selected.numel(),
                 "selected_min_adv": pool.n_selected_min_adv}
        state = {"p_up": adaptive.history, "accs": adaptive.accs, "makeup": makeup.history,
                 "minperturb": probe.history, "probe_shard": int(probe._probe[0].shape[0]), "metrics": metrics,
                 "fig8_local": local}
        path = Path(self.out) / f"rank{trainer.global_rank}_devices{trainer.world_size}.json"
        path.write_text(json.dumps(state))


def data(devices: int) -> tuple[DataLoader, DataLoader]:
    x, y = tiny_batch(N_TRAIN + N_VAL, seed=3)
    xt, yt = x[:N_TRAIN], y[:N_TRAIN]
    if devices == 1:
        # The order in which two DDP ranks consume batches: rank 0's batch s, then rank 1's batch s.
        shards = [torch.arange(r, N_TRAIN, WORLD) for r in range(WORLD)]
        order = torch.cat([s[i:i + BATCH] for i in range(0, N_TRAIN // WORLD, BATCH) for s in shards])
        xt, yt = xt[order], yt[order]
    train = DataLoader(TensorDataset(xt, yt), batch_size=BATCH, sampler=RankStride(len(xt)))
    val = DataLoader(TensorDataset(x[N_TRAIN:], y[N_TRAIN:]), batch_size=BATCH, sampler=RankStride(N_VAL))
    return train, val


def run(out: str, devices: int) -> None:
    torch.manual_seed(0)
    attack = AttackConfig(eps=0.1, alpha=0.05, steps=2, random_start=False, mode="train")
    module = AdversarialSelectionModule(TinyNet(), recipe="ds", p_up=1.0, train_attack=attack,
                                        eval_attack=AttackConfig(eps=0.1, alpha=0.05, steps=2, random_start=False),
                                        optimizer=functools.partial(torch.optim.SGD, lr=0.0))
    callbacks = [AdaptivePUp(mode="paper", min_p_up=0.05), SelectionMakeup(),
                 MinimumPerturbation(probe_size=PROBE, every_n_epochs=1, max_eps=0.3, num_eps=6, steps=2),
                 DumpRank(out)]
    trainer = L.Trainer(default_root_dir=out, max_epochs=2, accelerator="cpu", devices=devices,
                        strategy="ddp_spawn" if devices > 1 else "auto", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=callbacks, use_distributed_sampler=False)
    train, val = data(devices)
    trainer.fit(module, train, val)


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]))
