"""Gradient clipping and accumulation as module arguments (Lightning refuses them on the Trainer under manual
optimization): what a window steps, what each batch draws, and a checkpoint taken inside a window."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import TinyNet, tiny_batch
from torch.utils.data import DataLoader, TensorDataset

from lightning_advsel import AdversarialSelectionModule, AttackConfig
from lightning_advsel.cli import build_cli
from lightning_advsel.data import DigitsDataModule

ATTACK = AttackConfig(eps=0.1, alpha=0.05, steps=1, mode="train")  # random start: each batch draws one


def make(**kwargs) -> AdversarialSelectionModule:
    torch.manual_seed(0)
    kwargs.setdefault("optimizer", lambda p: torch.optim.SGD(p, lr=0.5))
    return AdversarialSelectionModule(TinyNet(), train_attack=ATTACK, **kwargs)


def trainer(tmp_path, **kwargs) -> L.Trainer:
    kwargs.setdefault("max_epochs", 1)
    return L.Trainer(default_root_dir=tmp_path, limit_val_batches=0, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1, **kwargs)


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def weights(module: AdversarialSelectionModule) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.model.parameters()]


def test_a_window_of_batches_makes_one_step_over_their_union(tmp_path):
    x, y = tiny_batch(16)
    accumulated, whole = make(recipe="standard", accumulate_grad_batches=2), make(recipe="standard")
    run = trainer(tmp_path)
    run.fit(accumulated, loader(x, y, 8))
    trainer(tmp_path).fit(whole, loader(x, y, 16))
    assert run.global_step == 1
    for a, b in zip(weights(accumulated), weights(whole), strict=True):
        torch.testing.assert_close(a, b)


def test_the_last_partial_window_of_each_epoch_steps_and_the_step_count_knows_it(tmp_path):
    x, y = tiny_batch(40)
    module = make(recipe="ds", accumulate_grad_batches=2)
    run = trainer(tmp_path, max_epochs=2)
    run.fit(module, loader(x, y, 8))  # 5 batches an epoch: windows of 2, 2 and 1
    assert run.global_step == 2 * 3
    assert module.estimated_optimizer_steps == 2 * 3
    assert run.estimated_stepping_batches == 2 * 5  # the Trainer does not know the module accumulates


def test_each_batch_of_a_window_draws_its_own_random_picks(tmp_path):
    class Picks(L.Callback):
        seen: list = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            self.seen.append(module.last_selection.selected.tolist())

    x, y = tiny_batch(8)
    picks = Picks()
    same_batch_twice = loader(torch.cat([x, x]), torch.cat([y, y]), 8)
    trainer(tmp_path, callbacks=[picks]).fit(make(recipe="random", accumulate_grad_batches=2), same_batch_twice)
    assert len(picks.seen) == 2 and picks.seen[0] != picks.seen[1]


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_clipping_bounds_each_update(tmp_path, algorithm):
    x, y = tiny_batch(16)
    clip, lr = 1e-3, 0.5
    module = make(recipe="standard", gradient_clip_val=clip, gradient_clip_algorithm=algorithm,
                  optimizer=lambda p: torch.optim.SGD(p, lr=lr))
    before = weights(module)
    trainer(tmp_path, max_steps=1).fit(module, loader(x, y, 16))
    change = torch.cat([(a - b).flatten() for a, b in zip(weights(module), before, strict=True)])
    bound = change.norm() if algorithm == "norm" else change.abs().max()
    assert 0 < bound <= lr * clip * (1 + 1e-5)


@pytest.mark.parametrize("setting", [{"gradient_clip_val": 0.5}, {"accumulate_grad_batches": 2}])
def test_the_trainers_clipping_or_accumulation_is_refused_naming_the_module_argument(tmp_path, setting):
    (name, value), = setting.items()
    module = make()
    before = weights(module)
    x, y = tiny_batch(16)
    with pytest.raises(ValueError, match=rf"`Trainer\({name}={value}\)`.*AdversarialSelectionModule\({name}="):
        trainer(tmp_path, **setting).fit(module, loader(x, y, 8))
    assert all(torch.equal(a, b) for a, b in zip(weights(module), before, strict=True))


def test_the_cli_takes_them_under_model_init_args(tmp_path):
    cfg = tmp_path / "accumulate.yaml"
    cfg.write_text("""model:
  class_path: lightning_advsel.AdversarialSelectionModule
  init_args:
    model:
      class_path: lightning_advsel.models.SmallCNN
      init_args:
        in_channels: 1
        input_size: 8                # pixels per side
    gradient_clip_val: 1.0           # total gradient norm
    gradient_clip_algorithm: norm
    accumulate_grad_batches: 4       # batches per optimizer step
data:
  class_path: lightning_advsel.data.DigitsDataModule
""")
    cli = build_cli(["--config", str(cfg), "--trainer.accelerator", "cpu", "--trainer.logger", "false"], run=False)
    assert (cli.model.gradient_clip_val, cli.model.gradient_clip_algorithm) == (1.0, "norm")
    assert cli.model.accumulate_grad_batches == 4


class SaveAt(L.Callback):
    """Saves a checkpoint after one batch of the first epoch; training goes on."""

    def __init__(self, path, batch_idx: int) -> None:  # noqa: ANN001
        self.path, self.batch_idx = path, batch_idx

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.current_epoch == 0 and batch_idx == self.batch_idx:
            trainer.save_checkpoint(self.path)


def test_a_checkpoint_inside_a_window_resumes_to_the_uninterrupted_weights(tmp_path):
    from lightning_advsel.schedules import Cosine

    def fit(callbacks: list, ckpt_path=None) -> AdversarialSelectionModule:  # noqa: ANN001
        torch.manual_seed(0)
        module = AdversarialSelectionModule(
            TinyNet(), recipe="ds", train_attack=ATTACK, accumulate_grad_batches=3, gradient_clip_val=1.0,
            optimizer=lambda p: torch.optim.Adam(p, lr=0.01), lr_scheduler=Cosine, scheduler_interval="step")
        run = trainer(tmp_path, max_epochs=2, limit_train_batches=5, callbacks=callbacks)
        run.fit(module, DigitsDataModule(batch_size=32), ckpt_path=ckpt_path)
        return module

    mid = tmp_path / "mid.ckpt"
    straight = fit([SaveAt(mid, batch_idx=3)])  # batch 3 is the first of the second window: its gradients pending
    saved = torch.load(mid, weights_only=True)
    assert saved["advsel"]["accumulation"]["grads"] is not None and saved["global_step"] == 1
    resumed = fit([], ckpt_path=mid)
    assert resumed.trainer.global_step == straight.trainer.global_step == 2 * 2
    for a, b in zip(weights(resumed), weights(straight), strict=True):
        assert torch.equal(a, b)
