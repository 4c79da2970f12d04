"""The checkpoint format holds: a checkpoint written by an earlier version resumes to the same weights.

``fixtures/digits_mid_window.ckpt`` was written by the code of the commit that added it, by :func:`fit` with
:class:`SaveAt`: a SmallCNN trained on digits with the ``ds`` recipe, an accumulation window of three batches and
the adaptive ``P_up``, saved at the second epoch's fourth batch. There a window is open (its gradients are in the
checkpoint), ``p_up`` has moved from 1, and the epoch's training metrics and the work counter hold counts, so
every part of the ``advsel`` entry is in use. Resumed, the run must end on :data:`RESUMED_WEIGHTS`, the hash of
the weights that the uninterrupted run reached when the fixture was written.

Regenerate the fixture only for a deliberate change of format: ``python tests/test_checkpoint_format.py``.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import lightning as L
import torch

from lightning_advsel import AdversarialSelectionModule, AttackConfig
from lightning_advsel.callbacks import AdaptivePUp
from lightning_advsel.data import DigitsDataModule
from lightning_advsel.models import SmallCNN

FIXTURE = Path(__file__).parent / "fixtures" / "digits_mid_window.ckpt"
SAVE_AT = (1, 3)  # (epoch, batch index): the first batch of the epoch's second window, its gradients pending
# The uninterrupted run's final weights (weights_hash), on this project's CPU machine, when FIXTURE was written.
RESUMED_WEIGHTS = "8bb0379104932107699d862acdb024ece32d984a644dd2528084f38e40ddde07"


class SaveAt(L.Callback):
    """Saves a checkpoint after one training batch."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if (trainer.current_epoch, batch_idx) == SAVE_AT:
            trainer.save_checkpoint(self.path)


def weights_hash(module: L.LightningModule) -> str:
    """SHA-256 over the state dict's names and tensor bytes, in order."""
    sha = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def fit(root: Path, callbacks: list[L.Callback], ckpt_path: Path | None = None) -> AdversarialSelectionModule:
    L.seed_everything(0, verbose=False)
    net = SmallCNN(in_channels=1, num_classes=10, input_size=8, width=4, hidden=16, mean=[0.3], std=[0.4])
    module = AdversarialSelectionModule(net, recipe="ds", p_up=1.0, accumulate_grad_batches=3,
                                        train_attack=AttackConfig(eps=0.1, alpha=0.05, steps=2, mode="train"),
                                        optimizer=lambda p: torch.optim.Adam(p, lr=0.01))
    trainer = L.Trainer(default_root_dir=root, max_epochs=3, limit_train_batches=5, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, deterministic=True,
                        callbacks=[AdaptivePUp(min_p_up=0.2), *callbacks])
    trainer.fit(module, DigitsDataModule(batch_size=32), ckpt_path=ckpt_path)
    return module


def test_the_fixture_holds_an_open_window_a_moved_p_up_and_training_metric_counts():
    saved = torch.load(FIXTURE, weights_only=True)
    state = saved["advsel"]
    assert state["accumulation"]["grads"] is not None and state["accumulation"]["window_batches"] == 1
    assert state["p_up"] < 1 and state["work"]["attack_grad_steps"] > 0
    assert float(state["train_metrics"]["train_acc"]["tp"].sum()) > 0


def test_a_checkpoint_of_today_has_the_fixtures_keys(tmp_path):
    mid = tmp_path / "mid.ckpt"
    fit(tmp_path, [SaveAt(mid)])
    today, fixture = torch.load(mid, weights_only=True), torch.load(FIXTURE, weights_only=True)

    def keys(value: object, prefix: str = "") -> set[str]:
        if isinstance(value, dict):
            return {k for key, item in value.items() for k in keys(item, f"{prefix}/{key}") | {f"{prefix}/{key}"}}
        return set()

    assert keys(today["advsel"]) == keys(fixture["advsel"])
    assert list(today["state_dict"]) == list(fixture["state_dict"])
    assert today["hyper_parameters"] == fixture["hyper_parameters"]


def test_the_fixture_resumes_to_the_weights_of_the_uninterrupted_run(tmp_path):
    resumed = fit(tmp_path, [], ckpt_path=FIXTURE)
    assert resumed.trainer.global_step == 3 * 2
    assert weights_hash(resumed) == RESUMED_WEIGHTS


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        FIXTURE.parent.mkdir(exist_ok=True)
        straight = fit(Path(folder), [SaveAt(FIXTURE)])
        print(f"{FIXTURE}: {FIXTURE.stat().st_size} bytes; uninterrupted weights {weights_hash(straight)}",
              file=sys.stderr)
