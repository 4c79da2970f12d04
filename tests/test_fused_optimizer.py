"""The fused optimizer step as an opt-in: the optimizer's own ``fused=True``, passed through the module's factory.

A fused step changes a user's numbers (the update's arithmetic is ordered differently), so the package never turns
it on; ``--model.init_args.optimizer.init_args.fused true`` does, for Adam, AdamW and SGD. What must hold: the
flag reaches the optimizer that ``configure_optimizers`` builds, a fit with the module's clipping and accumulation
lands within rounding of the unfused fit, and the one combination Lightning refuses is known.
"""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from conftest import TinyNet, config_args, tiny_batch
from torch.utils.data import DataLoader, TensorDataset

from lightning_advsel.attacks import AttackConfig
from lightning_advsel.cli import build_cli
from lightning_advsel.module import AdversarialSelectionModule

ATTACK = AttackConfig(eps=0.1, alpha=0.025, steps=2, mode="train")


def fit(optimizer: type[torch.optim.Optimizer], fused: bool, precision: str = "32-true",
        clip: float | None = 0.5) -> L.Trainer:
    """Four batches of 16, two to an optimizer step, clipped at ``clip``: two steps of ``optimizer``."""
    torch.manual_seed(0)
    model = AdversarialSelectionModule(TinyNet(batchnorm=True), train_attack=ATTACK, eval_attack=None,
                                       recipe="robust", optimizer=functools.partial(optimizer, lr=0.05, fused=fused),
                                       gradient_clip_val=clip, accumulate_grad_batches=2)
    x, y = tiny_batch(64)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, precision=precision)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
    return trainer


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_a_fused_step_with_clipping_and_accumulation_lands_within_rounding_of_the_unfused_one(optimizer):
    unfused, fused = fit(optimizer, False), fit(optimizer, True)
    assert fused.optimizers[0].defaults["fused"] is True and not unfused.optimizers[0].defaults["fused"]
    assert fused.global_step == unfused.global_step == 2
    for a, b in zip(unfused.lightning_module.parameters(), fused.lightning_module.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["torch.optim.AdamW", "torch.optim.SGD"])
def test_the_command_line_passes_fused_to_the_optimizer_it_builds(tmp_path, monkeypatch, optimizer):
    monkeypatch.chdir(tmp_path)
    cli = build_cli([*config_args("digits/base.yaml", "recipes/robust.yaml"), "--trainer.logger", "false",
                     "--model.init_args.optimizer", optimizer, "--model.init_args.optimizer.init_args.lr", "0.1",
                     "--model.init_args.optimizer.init_args.fused", "true"], run=False)
    built = cli.model.configure_optimizers()
    built = built["optimizer"] if isinstance(built, dict) else built
    assert type(built).__name__ == optimizer.rsplit(".", 1)[1] and built.defaults["fused"] is True


def test_under_mixed_precision_lightning_refuses_clipping_a_fused_optimizer():
    """Lightning's mixed-precision plugin refuses to clip for any optimizer that unscales gradients itself, which
    fused optimizers declare, even under bf16 where no scaler runs: with bf16-mixed, the fused step goes without
    ``gradient_clip_val``."""
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping.*fused"):
        fit(torch.optim.AdamW, True, precision="bf16-mixed")
    assert fit(torch.optim.AdamW, True, precision="bf16-mixed", clip=None).global_step == 2
