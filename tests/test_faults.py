"""Faults stop training loudly or are skipped on purpose: NaN/inf, a wrong model, a foreign checkpoint."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import TinyNet, fit_steps, tiny_batch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_advsel import AdversarialSelectionModule, AttackConfig

ATTACK = AttackConfig(eps=0.1, alpha=0.05, steps=1, random_start=False, mode="train")


def make(**kwargs) -> AdversarialSelectionModule:
    torch.manual_seed(0)
    kwargs.setdefault("model", TinyNet())
    return AdversarialSelectionModule(recipe="ds", p_up=0.5, train_attack=ATTACK,
                                      optimizer=lambda p: torch.optim.SGD(p, lr=0.1), **kwargs)


def four_batches(nan_batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = tiny_batch(32)
    if nan_batch is not None:
        x[nan_batch * 8 + 3, 0, 2, 2] = float("nan")
    return x, y


def fit_batches(module, x, y, tmp_path, **kwargs) -> L.Trainer:
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=1, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1, **kwargs)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False))
    return trainer


class PoisonAt(L.Callback):
    """Sets every weight to NaN before a given batch: the loss of that step is NaN."""

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:  # noqa: ANN001
        if batch_idx == self.batch_idx:
            with torch.no_grad():
                for p in module.model.parameters():
                    p.fill_(float("nan"))


def test_nan_input_raises_naming_the_step_and_batch(tmp_path):
    x, y = four_batches(nan_batch=2)
    module = make()
    with pytest.raises(ValueError, match=r"training batch 2 \(global step 2\) holds NaN or inf inputs.*nonfinite"):
        fit_batches(module, x, y, tmp_path)


def test_nan_loss_raises_naming_the_step(tmp_path):
    x, y = four_batches()
    with pytest.raises(FloatingPointError, match=r"training loss is nan at global step 1 \(batch 1\)"):
        fit_batches(make(), x, y, tmp_path, callbacks=[PoisonAt(1)])


def test_skip_mode_drops_the_bad_step_counts_it_and_keeps_the_model_finite(tmp_path):
    x, y = four_batches(nan_batch=1)
    module = make(nonfinite="skip")
    with pytest.warns(UserWarning, match=r"skipped a training step \(global step 1, batch 1\): non-finite input"):
        trainer = fit_batches(module, x, y, tmp_path)
    assert module.skipped_steps == 1
    assert trainer.global_step == 3  # four batches, three updates
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 1.0
    path = tmp_path / "skip.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["advsel"]["skipped_steps"] == 1
    reloaded = AdversarialSelectionModule.load_from_checkpoint(path, model=TinyNet())
    assert reloaded.skipped_steps == 1


def test_skip_mode_also_drops_a_nan_loss_without_updating(tmp_path):
    x, y = four_batches()
    module = make(nonfinite="skip")
    with pytest.warns(UserWarning, match=r"non-finite loss"):
        trainer = fit_batches(module, x, y, tmp_path, callbacks=[PoisonAt(3)])
    assert module.skipped_steps == 1 and trainer.global_step == 3


class WrongHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_a_model_with_the_wrong_output_shape_fails_before_any_update(tmp_path):
    module = make(model=WrongHead())
    before = [p.detach().clone() for p in module.model.parameters()]
    x, y = tiny_batch(16)
    with pytest.raises(ValueError, match=r"`model` must return logits of shape .* \(1, 10\) .*got \(1, 5\)"):
        fit_steps(module, x, y, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(before, module.model.parameters(), strict=True))


@pytest.mark.parametrize(
    "other,match",
    [
        (lambda: TinyNet(num_classes=5),
         r"shape mismatches \[.*model.net.3.weight: checkpoint \(10, 32\), model \(5, 32\)"),
        (lambda: TinyNet(batchnorm=True), r"missing keys \[model.net.1.num_batches_tracked, model.net.1.running_mean"),
        (WrongHead, r"unexpected keys \[model.net.3"),
    ],
)
def test_a_checkpoint_of_another_architecture_is_refused_by_name(tmp_path, other, match):
    x, y = tiny_batch(16)
    trainer = fit_steps(make(), x, y, tmp_path)
    path = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match=r"different model architecture.*" + match):
        AdversarialSelectionModule.load_from_checkpoint(path, model=other(), num_classes=5)


def test_resuming_fit_from_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    x, y = tiny_batch(16)
    trainer = fit_steps(make(), x, y, tmp_path)
    path = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match=r"different model architecture than `model` \(TinyNet\)"):
        L.Trainer(default_root_dir=tmp_path, max_steps=2, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(
            make(model=TinyNet(batchnorm=True)), DataLoader(TensorDataset(x, y), batch_size=16), ckpt_path=path)


def test_checkpoints_load_with_weights_only(tmp_path):
    x, y = tiny_batch(16)
    trainer = fit_steps(make(nonfinite="skip", selection_scope="global"), x, y, tmp_path)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["hyper_parameters"]["nonfinite"] == "skip"
    assert ckpt["hyper_parameters"]["selection_scope"] == "global"
    assert set(ckpt["advsel"]["train_metrics"]) >= {"train_acc", "train_adv_frac"}
    # Lightning's own resume path with weights_only=True (what `--weights_only true` does in the CLI).
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(make(), DataLoader(TensorDataset(x, y), batch_size=16), ckpt_path=path, weights_only=True)
    assert trainer.global_step == 2


def test_a_truncated_checkpoint_is_refused_by_load_from_checkpoint_naming_the_file(tmp_path):
    x, y = tiny_batch(16)
    path = tmp_path / "tiny.ckpt"
    fit_steps(make(), x, y, tmp_path).save_checkpoint(path)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"`checkpoint_path` '{truncated}' is not a readable checkpoint \(truncated"):
        AdversarialSelectionModule.load_from_checkpoint(truncated, model=TinyNet())
    intact = AdversarialSelectionModule.load_from_checkpoint(path, model=TinyNet())
    assert intact.p_up == 0.5


class CountValidation(L.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_validation_batch_end(self, *args) -> None:  # noqa: ANN002
        self.batches += 1


def test_an_unshuffled_empty_training_set_fails_before_any_work(tmp_path):
    # A shuffled empty loader already fails when it is built (RandomSampler); Lightning only warns about this one.
    x, y = tiny_batch(16)
    seen = CountValidation()
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[seen])
    with pytest.raises(ValueError, match=r"the training data loader yields no batches \(an empty training set"):
        trainer.fit(make(), DataLoader(TensorDataset(x[:0], y[:0]), batch_size=8, shuffle=False),
                    DataLoader(TensorDataset(x, y), batch_size=8))
    assert trainer.global_step == 0 and seen.batches == 0  # not even the validation sanity check ran
