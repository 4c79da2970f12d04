"""The speed options: pgd's unchecked inner path, mixed precision, channels_last and a compiled model (CPU)."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from conftest import TinyNet, config_args, fit_steps, tiny_batch

from lightning_advsel import AdversarialSelectionModule, AttackConfig, StepSettings, adversarial_step, pgd
from lightning_advsel.cli import build_cli
from lightning_advsel.data import DigitsDataModule
from lightning_advsel.models import SmallCNN

ATTACK = dict(eps=0.1, alpha=0.025, steps=3)


def digits_net() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(width=8, hidden=32, mean=(0.3,), std=(0.4,))


# ------------------------------------------------------------------------------------------ unchecked path
@pytest.mark.parametrize("norm,restarts", [("linf", 1), ("l2", 2)])
def test_the_training_steps_unchecked_attack_gives_exactly_the_examples_of_pgd(norm, restarts):
    x, y = tiny_batch(16)
    net = digits_net()
    checked = pgd(net, x, y, **ATTACK, norm=norm, restarts=restarts, generator=torch.Generator().manual_seed(3))
    inner = AttackConfig(**ATTACK, norm=norm, restarts=restarts).unchecked(net, x, y, torch.Generator().manual_seed(3))
    assert torch.equal(checked, inner)


def test_pgd_keeps_its_checks_for_callers():
    x, y = tiny_batch(4)
    with pytest.raises(ValueError, match=r"`x` must hold finite pixels in \[0, 1\]"):
        pgd(TinyNet(), x * 255, y, **ATTACK)


def test_training_refuses_pixels_outside_0_1_at_the_first_batch(tmp_path):
    x, y = tiny_batch(16)
    module = AdversarialSelectionModule(TinyNet(), recipe="robust", train_attack=AttackConfig(**ATTACK),
                                        eval_attack=None)
    with pytest.raises(ValueError, match=r"`x` must hold finite pixels in \[0, 1\].*got values in \[0\.0.*, 1\.99"):
        fit_steps(module, x * 2, y, tmp_path)


def validate(module: AdversarialSelectionModule, x: torch.Tensor, y: torch.Tensor, tmp_path) -> list[dict]:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    return trainer.validate(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8),
                            verbose=False)


def test_validation_refuses_pixels_outside_0_1_at_its_first_batch(tmp_path):
    x, y = tiny_batch(16)
    module = AdversarialSelectionModule(TinyNet(), recipe="robust", eval_attack=AttackConfig(**ATTACK))
    with pytest.raises(ValueError, match=r"`x` must hold finite pixels in \[0, 1\].*got values in \[0\.0.*, 1\.99"):
        validate(module, x * 2, y, tmp_path)


def test_an_attacked_validation_refuses_nan_inputs_before_attacking_and_an_unattacked_one_reports_them(tmp_path):
    x, y = tiny_batch(16)
    x[12, 0, 3, 3] = float("nan")  # in the second batch, after the first batch's check
    attacked = AdversarialSelectionModule(TinyNet(), recipe="robust", eval_attack=AttackConfig(**ATTACK))
    with pytest.raises(ValueError, match=r"^val batch 1 holds NaN or inf inputs; the val attack needs finite pixels"):
        validate(attacked, x, y, tmp_path)
    clean_only = AdversarialSelectionModule(TinyNet(), recipe="robust", eval_attack=None)
    assert torch.isnan(torch.tensor(validate(clean_only, x, y, tmp_path)[0]["val/loss_clean"]))


def test_validations_unchecked_attack_gives_pgds_robust_accuracy(tmp_path):
    x, _ = tiny_batch(16)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with torch.no_grad():
        y = net(x).argmax(1)  # every row right before the attack, so that the attack decides the accuracy
    attack = dict(eps=0.1, alpha=0.05, steps=3)
    module = AdversarialSelectionModule(net, recipe="robust", eval_attack=AttackConfig(**attack))
    robust = validate(module, x, y, tmp_path)[0]["val/acc_robust"]
    correct = 0
    for i in range(2):  # the module seeds each batch's attack by its index
        rows = slice(8 * i, 8 * i + 8)
        x_adv = pgd(net, x[rows], y[rows], **attack, generator=module._generator(x.device, -(i + 1)))
        correct += int((net(x_adv).argmax(1) == y[rows]).sum())
    assert 0 < correct < 16 and robust == pytest.approx(correct / 16)


# ---------------------------------------------------------------------------------------- mixed precision
def test_float16_autocast_leaves_the_attack_in_float32():
    """A float16 region would flush a confident model's input gradients to zero; the attack runs in float32."""
    x, y = tiny_batch(16)
    net = digits_net()
    full = pgd(net, x, y, **ATTACK, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.float16):
        assert net(x).dtype == torch.float16  # the region is float16 for the model outside the attack
        mixed = pgd(net, x, y, **ATTACK, generator=torch.Generator().manual_seed(0))
    assert torch.equal(full, mixed)


class DtypeRecorder(SmallCNN):
    """SmallCNN that records the dtype of its logits, apart for the attack's forwards (input needs a gradient)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(width=8, hidden=32, mean=(0.3,), std=(0.4,))
        self.seen: dict[str, set[torch.dtype]] = {"attack": set(), "other": set()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        self.seen["attack" if x.requires_grad else "other"].add(logits.dtype)
        return logits


def test_bf16_mixed_training_runs_the_whole_step_in_bfloat16(tmp_path):
    x, y = tiny_batch(32)
    net = DtypeRecorder()
    before = [p.detach().clone() for p in net.parameters()]
    module = AdversarialSelectionModule(net, recipe="ds", train_attack=AttackConfig(**ATTACK, mode="train"),
                                        eval_attack=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_steps(module, x, y, tmp_path, steps=2, precision="bf16-mixed")
    assert net.seen == {"attack": {torch.bfloat16}, "other": {torch.bfloat16}}
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_a_float16_step_attacks_in_float32_and_scores_and_trains_in_float16():
    """What Lightning's 16-mixed does on a GPU (on CPU it falls back to bf16): the step inside float16 autocast."""
    x, y = tiny_batch(32)
    net = DtypeRecorder()
    with torch.autocast("cpu", dtype=torch.float16):
        out = adversarial_step(net, x, y, StepSettings(recipe="selective_ds", train_attack=AttackConfig(**ATTACK)))
    assert net.seen == {"attack": {torch.float32}, "other": {torch.float16}}
    assert torch.isfinite(out.loss)


def test_bf16_training_and_evaluation_keep_robust_accuracy_within_one_point_of_fp32(tmp_path):
    """Train on digits under bf16-mixed, then evaluate the same weights under fp32 and bf16 autocast."""
    data = DigitsDataModule(batch_size=64)
    module = AdversarialSelectionModule(
        digits_net(), recipe="robust", train_attack=AttackConfig(**ATTACK, mode="train"),
        eval_attack=AttackConfig(eps=0.1, alpha=0.01, steps=20), seed=0,  # the digits config's PGD-20
        optimizer=lambda params: torch.optim.Adam(params, lr=0.005))

    def trainer(precision: str, epochs: int = 0) -> L.Trainer:
        return L.Trainer(default_root_dir=tmp_path, max_epochs=epochs, precision=precision, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1, num_sanity_val_steps=0,
                         limit_val_batches=0 if epochs else 1.0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = trainer("bf16-mixed", epochs=4)
        fitted.fit(module, datamodule=data)
        assert fitted.callback_metrics["train/acc"] > 0.3  # it learned under autocast (chance is 0.1)
        accuracy = {precision: trainer(precision).validate(module, datamodule=data, verbose=False)[0]
                    for precision in ("32-true", "bf16-mixed")}
    robust = {p: a["val/acc_robust"] for p, a in accuracy.items()}
    assert robust["32-true"] > 0.2  # a model with something to lose to a weaker attack
    assert abs(robust["bf16-mixed"] - robust["32-true"]) <= 0.01, robust
    assert abs(accuracy["bf16-mixed"]["val/acc_clean"] - accuracy["32-true"]["val/acc_clean"]) <= 0.01, accuracy


# ------------------------------------------------------------------------------------------- channels_last
def test_channels_last_stores_conv_weights_nhwc_and_computes_the_same_logits(tmp_path):
    x, y = tiny_batch(16)
    plain = digits_net()
    module = AdversarialSelectionModule(digits_net(), recipe="ds", channels_last=True,
                                        train_attack=AttackConfig(**ATTACK, mode="train"), eval_attack=None)
    conv = module.model.features[2].weight  # 8 -> 8 channels (a 1-channel kernel is both layouts at once)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert torch.allclose(module.model(x), plain(x), atol=1e-5)
    assert set(module.state_dict()) >= {f"model.{k}" for k in plain.state_dict()}  # checkpoints load either way
    fit_steps(module, x, y, tmp_path, steps=2)
    assert module.model.features[2].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", ["channels_last", "compile_model"])
def test_speed_switches_must_be_bools(name):
    with pytest.raises(ValueError, match=rf"`{name}` must be true or false, got 1"):
        AdversarialSelectionModule(TinyNet(), **{name: 1})


# ------------------------------------------------------------------------------------------ torch.compile
def test_compiled_model_has_no_graph_break():
    explained = torch._dynamo.explain(digits_net())(tiny_batch(4)[0])
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_compiled_model_stops_compiling_after_the_first_steps(tmp_path, monkeypatch):
    """Each PGD step and each training step reuses the graphs compiled in the first steps.

    The backend is a counting one around eager execution (``torch.compile``'s documented custom-backend hook), so
    the test sees every graph that would be compiled without paying for code generation on CPU.
    """
    graphs = []

    def counting_backend(gm, example_inputs):  # noqa: ANN001, ANN202 - torch.compile's backend signature
        graphs.append(gm)
        return gm.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compile_(fn, **{**kwargs, "backend": counting_backend}))
    x, y = tiny_batch(64)
    torch._dynamo.reset()
    module = AdversarialSelectionModule(digits_net(), recipe="selective_ds", compile_model=True, eval_attack=None,
                                        train_attack=AttackConfig(**ATTACK, mode="train"))
    keys = set(module.state_dict())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)

    def fit(steps: int) -> None:
        trainer = L.Trainer(default_root_dir=tmp_path, max_steps=steps, limit_val_batches=0, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            accelerator="cpu", devices=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, loader)

    fit(2)
    warm = len(graphs)
    assert warm > 0  # the forward did go through torch.compile
    fit(4)  # two more steps of 3 PGD steps each, same shapes
    assert len(graphs) == warm
    assert set(module.state_dict()) == keys  # compiled in place: checkpoints keep their keys


def test_gpu_overlay_sets_bf16_mixed_precision_and_channels_last(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli([*config_args("digits/base.yaml", "recipes/ds.yaml", "trainer/gpu_bf16.yaml"),
                     "--trainer.accelerator", "cpu"], run=False)
    assert cli.model.channels_last and not cli.model.compile_model
    assert cli.trainer.precision == "bf16-mixed"
    assert cli.trainer.logger.name == "digits/ds"  # a trainer overlay does not rename the run


@pytest.mark.slow
def test_compiled_model_trains_to_the_weights_of_the_eager_one(tmp_path):
    """The default backend (inductor, C++ on CPU) end to end: two robust steps of a small MLP."""
    x, y = tiny_batch(32)
    weights = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        module = AdversarialSelectionModule(TinyNet(), recipe="robust", compile_model=compiled, eval_attack=None,
                                            train_attack=AttackConfig(**ATTACK, mode="train"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit_steps(module, x, y, tmp_path, steps=2)
        weights[compiled] = module.model.state_dict()
    for key, value in weights[False].items():
        assert torch.allclose(weights[True][key], value, atol=1e-6), key
    torch.manual_seed(0)
    assert not torch.equal(weights[False]["net.1.weight"], TinyNet().net[1].weight)  # it did train
