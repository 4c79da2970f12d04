"""The module's ``compile_attack`` option (lightning_advsel.attack_compilation) through short fits on CPU.

Compiled with ``aot_eager``, counted by ``torch._dynamo.testing.CompileCounterWithBackend``, as
tests/test_compiled_attack.py does: what is checked is the wiring (the same losses as the eager attack, graphs
bounded by the run's sizes, the fit-start line, bf16, the CLI), not inductor's code generation.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import TinyNet, config_args, fit_steps, tiny_batch
from lightning.pytorch.callbacks import Callback
from test_compiled_attack import SyncNet
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils.data import DataLoader, TensorDataset

from lightning_advsel import attack_compilation, module
from lightning_advsel.attack_compilation import AttackCompilation
from lightning_advsel.attacks import AttackConfig
from lightning_advsel.cli import build_cli
from lightning_advsel.module import AdversarialSelectionModule
from lightning_advsel.objectives import Objective
from lightning_advsel.step import eager_attack

ATTACK = AttackConfig(eps=0.1, alpha=0.025, steps=2, mode="train")
# Per-step training losses of the compiled and the eager attack: the same operators (aot_eager), so they differ
# only by the order of floating-point sums inside torch.func's gradient, compounded over a few optimizer steps.
LOSS_RTOL = 1e-4


@pytest.fixture(autouse=True)
def counter(monkeypatch) -> CompileCounterWithBackend:
    """Every compiled attack of these tests on aot_eager, counted; dynamo's caches fresh for each test."""
    torch._dynamo.reset()
    counting = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(AttackCompilation, "backend", counting)
    yield counting
    torch._dynamo.reset()


@pytest.fixture
def said(monkeypatch) -> list[str]:
    lines: list[str] = []
    monkeypatch.setattr(module, "rank_zero_info", lines.append)
    return lines


class Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.selected: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))
        self.selected.append(pl_module.last_selection.selected.numel())


def tiny_module(compile_attack: bool, **kwargs) -> AdversarialSelectionModule:
    torch.manual_seed(0)
    kwargs.setdefault("eval_attack", None)
    return AdversarialSelectionModule(TinyNet(batchnorm=True), train_attack=ATTACK, compile_attack=compile_attack,
                                      **kwargs)


def train(module: AdversarialSelectionModule, tmp_path, rows: int = 16, batch_size: int = 16, epochs: int = 1,
          **trainer_kwargs) -> Losses:
    x, y = tiny_batch(rows)
    losses = Losses()
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                        callbacks=[losses], **trainer_kwargs)
    trainer.fit(module, loader, DataLoader(TensorDataset(x[:8], y[:8]), batch_size=8)
                if module.eval_attack is not None else None)
    return losses


@pytest.mark.parametrize("recipe", ["robust", "ds", "selective"])
def test_a_short_fit_trains_on_the_eager_attacks_losses(tmp_path, counter, recipe):
    runs = {flag: train(tiny_module(flag, recipe=recipe, p_up=0.5 if recipe == "ds" else 1.0), tmp_path / str(flag),
                        rows=48) for flag in (False, True)}
    assert runs[True].selected == runs[False].selected  # the same selection sizes, batch by batch
    assert runs[True].losses == pytest.approx(runs[False].losses, rel=LOSS_RTOL)
    assert len(runs[True].losses) == 3 and counter.frame_count == 1  # one graph: a batch size of 16 rows


def test_an_epoch_with_radius_warm_up_attack_warm_up_and_a_short_last_batch_compiles_each_size_once(tmp_path,
                                                                                                    counter, said):
    """Two epochs of 40 rows in batches of 16 (the last of 8), the radius rising every batch, every row attacked in
    the first epoch: the graphs are those the fit-start line lists, and no batch runs eagerly."""
    model = tiny_module(True, recipe="selective", p_up=1.0, attack_warmup_epochs=1, eps_warmup_epochs=2)
    train(model, tmp_path, rows=40, epochs=2)
    compiled = model.attack_compilation.train
    assert counter.frame_count == compiled.compilations == compiled.max_graphs == 3  # 16, 8 and 4 rows
    assert compiled.eager_calls == 0
    assert "3 attack graph(s) in all, for 16, 8, 4 rows" in said[0] and "last batch of 8 rows" in said[0]


def test_the_fit_start_line_names_the_plan_and_the_validation_attack_compiles_too(tmp_path, counter, said):
    model = tiny_module(True, recipe="ds", eval_attack=AttackConfig(eps=0.1, alpha=0.05, steps=2))
    train(model, tmp_path, rows=32, num_sanity_val_steps=0)
    assert len(said) == 1 and said[0].startswith("compile_attack: ds attacks 16 of 16 rows a batch")
    assert "one compiled graph" in said[0] and "stay eager" in said[0]
    assert model.attack_compilation.eval.compilations == 1 and model.attack_compilation.eval.eager_calls == 0
    assert counter.frame_count == 2  # the training graph and the validation one (eval mode)


def test_validation_accuracy_under_the_compiled_attack_is_the_eager_ones(tmp_path):
    accuracy = {}
    for flag in (False, True):
        model = tiny_module(flag, recipe="robust", eval_attack=AttackConfig(eps=0.1, alpha=0.05, steps=2))
        trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path, accelerator="cpu")
        x, y = tiny_batch(32)
        accuracy[flag] = trainer.validate(model, DataLoader(TensorDataset(x, y), batch_size=16), verbose=False)[0]
    assert accuracy[True]["val/acc_robust"] == pytest.approx(accuracy[False]["val/acc_robust"])


def test_a_setting_that_stays_eager_says_why_and_trains(tmp_path, counter, said):
    model = AdversarialSelectionModule(SyncNet(), recipe="robust", train_attack=ATTACK, eval_attack=None,
                                       compile_attack=True)
    x, y = tiny_batch(8)
    fit_steps(model, x, y, tmp_path)
    assert len(said) == 1 and "the training attack stays eager: SyncBatchNorm" in said[0]
    assert model.attack_compilation.train is None and counter.frame_count == 0


def test_data_decided_sizes_are_named_in_the_line(tmp_path, said):
    model = tiny_module(True, recipe="selective", objective="trades", p_up=0.5)
    x, y = tiny_batch(16)
    fit_steps(model, x, y, tmp_path)
    assert "objective 'trades' at p_up 0.5" in said[0] and "one compiled graph" in said[0]


def test_bf16_autocast_through_the_module_runs_the_compiled_attack(tmp_path, counter):
    model = tiny_module(True, recipe="robust")
    x, y = tiny_batch(16)
    fit_steps(model, x, y, tmp_path, steps=2, precision="bf16-mixed")
    assert counter.frame_count == 1 and model.attack_compilation.train.eager_calls == 0


def test_the_option_is_checked_by_name_and_off_by_default():
    assert tiny_module(False).attack_compilation.train is None and not tiny_module(False).compile_attack
    with pytest.raises(ValueError, match=r"`compile_attack` must be true or false, got 'yes'"):
        tiny_module("yes")


def test_an_old_torch_is_refused_naming_the_option(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.10.1")
    with pytest.raises(RuntimeError, match=r"`compile_attack` needs torch >= 2\.11 .*found 2\.10\.1"):
        tiny_module(True)


def test_the_pixel_model_is_built_once_and_holds_no_weights_of_its_own():
    model = AdversarialSelectionModule(TinyNet(), input_normalization=([0.5], [0.25]))
    assert model.pixel_model is model.pixel_model
    assert set(model.state_dict()) == set(AdversarialSelectionModule(TinyNet(), input_normalization=(
        [0.5], [0.25])).state_dict())
    assert not any(isinstance(m, nn.Sequential) and m is model.pixel_model for m in model.modules())


def test_the_cli_accepts_the_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli([*config_args("digits/base.yaml", "recipes/robust.yaml"), "--trainer.logger", "false",
                     "--model.init_args.compile_attack", "true"], run=False)
    assert cli.model.compile_attack is True and isinstance(cli.model.attack_compilation, AttackCompilation)


def test_the_training_loaders_sizes_are_read_or_said_unknown():
    x, y = tiny_batch(40)
    assert attack_compilation.loader_rows(DataLoader(TensorDataset(x, y), batch_size=16)) == (16, 8)
    assert attack_compilation.loader_rows(DataLoader(TensorDataset(x, y), batch_size=8)) == (8, None)
    assert attack_compilation.loader_rows(DataLoader(TensorDataset(x, y), batch_size=16, drop_last=True)) == (16,
                                                                                                             None)
    assert attack_compilation.loader_rows([DataLoader(TensorDataset(x, y))]) is None


def test_a_fit_with_lightnings_defaults_logs_and_checkpoints(tmp_path, counter):
    """Progress bar, logger and checkpointing on: the option is kept out of the checkpoint's hyperparameters."""
    model = tiny_module(True, recipe="robust")
    x, y = tiny_batch(16)
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=1, accelerator="cpu", devices=1)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
    saved = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)
    # How the attack ran is no property of the weights: the machine that loads them decides it again.
    assert "compile_attack" not in saved["hyper_parameters"] and counter.frame_count == 1
    assert not AdversarialSelectionModule.load_from_checkpoint(trainer.checkpoint_callback.best_model_path,
                                                               model=TinyNet(batchnorm=True)).compile_attack


def test_a_resumed_run_ends_on_the_uninterrupted_runs_weights(tmp_path):
    """One batch an epoch: two epochs, a checkpoint, two more, against four in one go. The steps' draws come from
    (seed, step, rank), so the compiled attack resumes exactly as the eager one."""
    x, y = tiny_batch(16)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)

    def run(epochs: int, root, ckpt_path=None) -> AdversarialSelectionModule:
        model = tiny_module(True, recipe="ds", eps_warmup_epochs=3)
        trainer = L.Trainer(default_root_dir=root, max_epochs=epochs, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
        trainer.fit(model, loader, ckpt_path=ckpt_path)
        if ckpt_path is None:
            trainer.save_checkpoint(root / "last.ckpt")
        return model

    whole = run(4, tmp_path / "whole")
    run(2, tmp_path / "first")
    resumed = run(4, tmp_path / "again", ckpt_path=tmp_path / "first" / "last.ckpt")
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_with_a_compiled_forward_the_attack_still_compiles_as_one_graph(counter):
    """``compile_model`` compiles the network in place (``nn.Module.compile``); the attack's graph traces through
    it into one graph of its own, while the eager parts keep the compiled forward."""
    net, (x, y) = TinyNet(batchnorm=True).train(), tiny_batch(16)
    net.compile(backend="aot_eager")
    attack = AttackCompilation(True).evaluation(x.device)
    out = attack(net, x, y, ATTACK, torch.Generator().manual_seed(1))
    eager = eager_attack(net, x, y, ATTACK, torch.Generator().manual_seed(1), Objective())
    assert counter.frame_count == 1 and attack.eager_calls == 0 and torch.allclose(out, eager, atol=1e-6)
