"""AdversarialSelectionModule: what each recipe attacks, selects and backpropagates."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet, fit_steps, tiny_batch
from torch.utils.data import DataLoader, TensorDataset

from lightning_advsel import AdversarialSelectionModule, AttackConfig, pgd
from lightning_advsel.attacks import model_mode
from lightning_advsel.selection import top_k

DETERMINISTIC_ATTACK = AttackConfig(eps=0.1, alpha=0.05, steps=2, random_start=False, mode="train")


def make(recipe="ds", p_up=0.5, net=None, **kwargs):
    torch.manual_seed(0)
    net = net or TinyNet()
    kwargs.setdefault("train_attack", DETERMINISTIC_ATTACK)
    return AdversarialSelectionModule(net, recipe=recipe, p_up=p_up,
                                      optimizer=lambda p: torch.optim.SGD(p, lr=0.1), **kwargs)


class RowCounter:
    """Counts rows through the head with grad enabled (forward) and rows reaching its backward."""

    def __init__(self, layer: torch.nn.Module) -> None:
        self.forward_rows: list[int] = []
        self.backward_rows: list[int] = []
        layer.register_forward_hook(self._fwd)
        layer.register_full_backward_hook(lambda _m, _gi, go: self.backward_rows.append(go[0].shape[0]))

    def _fwd(self, _m, inputs, _out):
        if torch.is_grad_enabled():
            self.forward_rows.append(inputs[0].shape[0])


@pytest.mark.parametrize(
    "recipe,p_up,pool_rows,trained_rows,adv_rows",
    [
        ("standard", 1.0, 16, 16, 0),
        ("robust", 1.0, 16, 16, 16),
        ("ds", 1.0, 32, 32, 16),
        ("ds", 0.5, 32, 16, None),
        ("ds", 0.25, 32, 8, None),
        ("random", 0.5, 32, 16, None),
    ],
)
def test_each_recipe_trains_on_its_pool_and_backpropagates_only_the_selected_rows(
        tmp_path, recipe, p_up, pool_rows, trained_rows, adv_rows):
    module = make(recipe, p_up)
    counter = RowCounter(module.model.net[-1])
    x, y = tiny_batch(16)
    fit_steps(module, x, y, tmp_path)
    record = module.last_selection
    assert record.y.shape[0] == pool_rows
    assert record.selected.numel() == trained_rows
    # Rows reaching backward = rows selected; the attack's input-gradient passes run with grad too, so only
    # the last forward-with-grad (the training forward) is compared.
    assert counter.backward_rows[-1] == trained_rows
    assert counter.forward_rows[-1] == trained_rows
    n_adv = int(record.is_adv[record.selected].sum())
    if adv_rows is not None:
        assert n_adv == adv_rows
    assert int(record.is_adv.sum()) == (0 if recipe == "standard" else 16)


def test_backward_work_scales_with_p_up(tmp_path):
    """Parameter-gradient FLOPs of the training backward halve from P_up = 1 to P_up = 0.5."""
    from torch.utils.flop_counter import FlopCounterMode

    def backward_flops(p_up):
        module = make("ds", p_up, train_attack=AttackConfig(eps=0.1, alpha=0.05, steps=1, random_start=False))
        x, y = tiny_batch(64)
        trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
        counter = FlopCounterMode(display=False)
        captured = {}
        original = module.manual_backward

        def counted_backward(loss, *args, **kwargs):
            with counter:
                original(loss, *args, **kwargs)
            captured["flops"] = counter.get_total_flops()

        module.manual_backward = counted_backward
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=64))
        return captured["flops"]

    full, half = backward_flops(1.0), backward_flops(0.5)
    assert full > 0
    assert half == pytest.approx(full / 2, rel=1e-6)


def test_ds_selects_exactly_the_top_p_up_of_the_pool_by_cross_entropy(tmp_path):
    module = make("ds", 0.5)
    model0 = copy.deepcopy(module.model)
    x, y = tiny_batch(16)
    fit_steps(module, x, y, tmp_path)
    # Recompute the pool independently from the initial weights: deterministic attack, same mode.
    x_adv = pgd(model0, x, y, eps=0.1, alpha=0.05, steps=2, random_start=False, mode="train")
    pool_x, pool_y = torch.cat([x, x_adv]), torch.cat([y, y])
    with torch.no_grad(), model_mode(model0, "train"):
        losses = F.cross_entropy(model0(pool_x), pool_y, reduction="none")
    record = module.last_selection
    assert torch.allclose(record.pool_scores, losses, atol=1e-6)
    assert set(record.selected.tolist()) == set(top_k(losses, 16).tolist())
    # Every selected loss is at least every unselected one.
    unselected = torch.ones(32, dtype=torch.bool)
    unselected[record.selected] = False
    assert losses[record.selected].min() >= losses[unselected].max()


def test_random_recipe_selects_a_reproducible_random_subset_not_the_top_k(tmp_path):
    x, y = tiny_batch(64)
    picks = []
    for seed in (0, 0, 1):
        module = make("random", 0.5, seed=seed)
        fit_steps(module, x, y, tmp_path)
        picks.append(module.last_selection.selected.tolist())
    assert picks[0] == picks[1] and picks[0] != picks[2]
    assert len(picks[0]) == 64


def test_batchnorm_running_stats_see_exactly_the_selected_rows(tmp_path):
    module = make("ds", 0.5, net=TinyNet(batchnorm=True))
    model0 = copy.deepcopy(module.model)
    bn = module.model.net[1]
    x, y = tiny_batch(16)
    fit_steps(module, x, y, tmp_path)
    x_adv = pgd(model0, x, y, eps=0.1, alpha=0.05, steps=2, random_start=False, mode="train")
    pool_x = torch.cat([x, x_adv]).flatten(1)
    selected = pool_x[module.last_selection.selected]
    momentum = bn.momentum
    expected_mean = (1 - momentum) * torch.zeros(64) + momentum * selected.mean(0)
    expected_var = (1 - momentum) * torch.ones(64) + momentum * selected.var(0, unbiased=True)
    assert torch.allclose(bn.running_mean, expected_mean, atol=1e-6)
    assert torch.allclose(bn.running_var, expected_var, atol=1e-5)
    assert int(bn.num_batches_tracked) == 1


def test_validation_robust_accuracy_is_measured_under_the_eval_attack(tmp_path):
    from lightning_advsel.data import DigitsDataModule

    eval_attack = AttackConfig(eps=0.3, alpha=0.05, steps=10, random_start=False)
    module = AdversarialSelectionModule(TinyNet(), recipe="standard", p_up=1.0, eval_attack=eval_attack,
                                        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    dm = DigitsDataModule(batch_size=128)
    trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(module, dm)
    clean = float(trainer.callback_metrics["val/acc_clean"])
    robust = float(trainer.callback_metrics["val/acc_robust"])
    # Recompute robust accuracy directly from the same attack outside Lightning's inference mode.
    dm.setup()
    x, y = dm.val_set.tensors
    module.model.eval()
    with torch.no_grad():
        direct_clean = (module.model(x).argmax(1) == y).float().mean().item()
    x_adv = pgd(module.model, x, y, eps=0.3, alpha=0.05, steps=10, random_start=False)
    with torch.no_grad():
        direct_robust = (module.model(x_adv).argmax(1) == y).float().mean().item()
    assert clean == pytest.approx(direct_clean, abs=1e-6) and clean > 0.8
    assert robust == pytest.approx(direct_robust, abs=1e-6)
    assert robust < clean - 0.3


def test_eval_attack_none_skips_robust_validation_and_the_default_is_pgd20_at_the_training_radius(tmp_path):
    train_attack = AttackConfig(eps=0.2, alpha=0.05, steps=2, norm="l2", mode="train")
    default = AdversarialSelectionModule(TinyNet(), train_attack=train_attack)
    assert default.eval_attack == AttackConfig(eps=0.2, alpha=0.01, steps=20, norm="l2")
    assert "val/acc_robust" in default.accuracy_keys()
    module = AdversarialSelectionModule(TinyNet(), train_attack=train_attack, eval_attack=None)
    assert module.eval_attack is None and module.robust_attack("test") is None
    assert "val/acc_robust" not in module.accuracy_keys()
    x, y = tiny_batch(16)
    trainer = fit_steps(module, x, y, tmp_path)
    validated = L.Trainer(logger=False, enable_progress_bar=False, accelerator="cpu", devices=1,
                          default_root_dir=tmp_path)
    validated.validate(module, DataLoader(TensorDataset(x, y), batch_size=8), verbose=False)
    assert "val/acc_clean" in validated.callback_metrics and "val/acc_robust" not in validated.callback_metrics
    # A checkpoint holds the attack itself: None, or the dict of an attack (as every older checkpoint does).
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    assert AdversarialSelectionModule.load_from_checkpoint(path, model=TinyNet()).eval_attack is None
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["eval_attack"] = dict(vars(default.eval_attack))
    torch.save(checkpoint, path)
    assert AdversarialSelectionModule.load_from_checkpoint(path, model=TinyNet()).eval_attack == default.eval_attack
    with pytest.raises(ValueError, match=r"`eval_attack` must be .*'auto' or None, got 'pgd'"):
        AdversarialSelectionModule(TinyNet(), eval_attack="pgd")


def test_p_up_is_saved_in_checkpoints_and_python_built_modules_reload_with_a_model(tmp_path):
    module = make("ds", 0.5)
    x, y = tiny_batch(16)
    trainer = fit_steps(module, x, y, tmp_path)
    module.p_up = 0.3
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = AdversarialSelectionModule.load_from_checkpoint(path, model=TinyNet())
    assert loaded.p_up == 0.3 and loaded.settings.recipe == "ds"
    for a, b in zip(loaded.model.parameters(), module.model.parameters(), strict=True):
        assert torch.equal(a, b)
    # Only plain values go into the checkpoint's hyperparameters when built from Python.
    ckpt = torch.load(path, weights_only=True)
    assert "model" not in ckpt["hyper_parameters"]
    assert ckpt["hyper_parameters"]["train_attack"]["steps"] == 2


@pytest.mark.parametrize("recipe,p_up", [("standard", 1.0), ("robust", 1.0), ("selective", 1.0), ("ds", 0.5),
                                          ("random", 0.5), ("selective_ds", 0.5)])
def test_p_up_defaults_to_the_recipes_own_and_an_explicit_value_is_kept(recipe, p_up):
    assert AdversarialSelectionModule(TinyNet(), recipe=recipe).p_up == p_up
    assert AdversarialSelectionModule(TinyNet(), recipe=recipe, p_up=None).p_up == p_up
    assert AdversarialSelectionModule(TinyNet(), recipe=recipe, p_up=0.25).p_up == 0.25


def test_robust_with_the_default_p_up_backpropagates_the_whole_batch(tmp_path):
    torch.manual_seed(0)
    module = AdversarialSelectionModule(TinyNet(), recipe="robust", train_attack=DETERMINISTIC_ATTACK)
    counter = RowCounter(module.model.net[-1])
    x, y = tiny_batch(16)
    fit_steps(module, x, y, tmp_path)
    # The last backward is the training one (the attack's input-gradient passes come first).
    assert counter.backward_rows[-1] == 16
    assert module.last_selection.selected.tolist() == list(range(16))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"p_up": 0.0}, r"`p_up` must be in \(0, 1\], got 0.0"),
        ({"p_up": 1.5}, r"`p_up` must be in \(0, 1\], got 1.5"),
        ({"p_up": float("nan")}, r"`p_up` must be a number in \(0, 1\], got nan"),
        ({"attack_frac": -0.5}, r"`attack_frac` must be in \(0, 1\], got -0.5"),
        ({"recipe": "madry"}, r"`recipe` must be one of .*'madry'"),
        ({"attack_score": "entropy"}, r"`attack_score` must be one of .*'entropy'"),
        ({"num_classes": 1}, r"`num_classes` must be an integer >= 2, got 1"),
        ({"scoring_mode": "half"}, r"`scoring_mode` must be one of .*'half'"),
        ({"scheduler_interval": "batch"}, r"`scheduler_interval` must be one of \('epoch', 'step'\), got 'batch'"),
        ({"seed": -1}, r"`seed` must be an integer >= 0, got -1"),
        ({"train_attack": {"eps": -1.0}}, r"`eps` must be a finite number >= 0.*-1.0"),
        ({"train_attack": {"steps": 0}}, r"`steps` must be an integer >= 1, got 0"),
        ({"eval_attack": {"norm": "l1"}}, r"`norm` must be one of .*'l1'"),
        ({"train_attack": {"epsilon": 0.1}}, r"`train_attack` has an unknown key"),
        ({"model": "resnet"}, r"`model` must be an nn.Module classifier, got str"),
    ],
)
def test_bad_module_arguments_fail_at_construction_naming_argument_and_value(kwargs, match):
    args = {"model": TinyNet(), **kwargs}
    with pytest.raises(ValueError, match=match):
        AdversarialSelectionModule(**args)


def test_non_finite_input_and_out_of_range_labels_stop_training_naming_the_step(tmp_path):
    x, y = tiny_batch(16)
    x[3, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"training batch 0 \(global step 0\) holds NaN or inf"):
        fit_steps(make("ds"), x, y, tmp_path)
    x, y = tiny_batch(16)
    y[0] = 12
    with pytest.raises(ValueError, match=r"labels in \[\d+, 12\], outside \[0, 9\]"):
        fit_steps(make("ds"), x, y, tmp_path)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_integer_labels_of_any_dtype_train_and_validate_as_int64_labels_do(tmp_path, dtype):
    x, y = tiny_batch(16)

    def run(labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        torch.manual_seed(0)
        module = make("ds")
        trainer = L.Trainer(default_root_dir=tmp_path, max_steps=2, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                            num_sanity_val_steps=0)
        loader = DataLoader(TensorDataset(x, labels), batch_size=8)
        trainer.fit(module, loader, loader)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        return torch.cat([p.detach().flatten() for p in module.model.parameters()]), metrics

    weights, metrics = run(y)
    same_weights, same_metrics = run(y.to(dtype))
    assert torch.equal(weights, same_weights) and metrics == same_metrics and "val/acc_robust" in metrics


def test_float_labels_and_out_of_range_validation_labels_fail_naming_the_batch(tmp_path):
    x, y = tiny_batch(16)
    with pytest.raises(ValueError, match=r"batch 0 has labels of type torch.float32; labels must be integer"):
        fit_steps(make("ds"), x, y.float(), tmp_path)
    bad = y.clone()
    bad[9] = 10
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, accelerator="cpu",
                        devices=1)
    with pytest.raises(ValueError, match=r"batch 1 has labels in \[\d+, 10\], outside \[0, 9\]"):
        trainer.validate(make("ds"), DataLoader(TensorDataset(x, bad), batch_size=8), verbose=False)


def test_scheduler_steps_per_epoch_or_per_step(tmp_path):
    x, y = tiny_batch(16)
    for interval, expected in (("step", 0.1 * 0.5**3), ("epoch", 0.1 * 0.5**3)):
        module = AdversarialSelectionModule(
            TinyNet(), recipe="standard", p_up=1.0, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
            scheduler_interval=interval)
        loader = DataLoader(TensorDataset(x, y), batch_size=16)
        trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
        trainer.fit(module, loader)
        assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected)
    # Per step, with 4 batches an epoch for one epoch: 4 halvings.
    module = AdversarialSelectionModule(
        TinyNet(), recipe="standard", p_up=1.0, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5), scheduler_interval="step")
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**4)


def test_a_module_built_from_python_keeps_no_copy_of_the_network():
    net = TinyNet()
    module = AdversarialSelectionModule(net, recipe="ds")
    # Lightning's hparams_initial is a deep copy: a network in it would be a second set of weights in memory.
    kept = [v for v in module.hparams_initial.values() if isinstance(v, torch.nn.Module)]
    assert kept == [] and "model" not in module.hparams
    assert module.hparams_initial["recipe"] == "ds"
