"""Batches as projects write them: mappings, extra fields, normalized inputs, several evaluation loaders."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet, config_args
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_advsel import AdversarialSelectionModule, AttackConfig, Normalize
from lightning_advsel.callbacks import AdaptivePUp, MinimumPerturbation, SelectionMakeup
from lightning_advsel.cli import build_cli
from lightning_advsel.dashboard import EPOCH_SECONDS
from lightning_advsel.data import DigitsDataModule

ATTACK = AttackConfig(eps=0.1, alpha=0.05, steps=2, mode="train")
EVAL = AttackConfig(eps=0.1, alpha=0.05, steps=3)
MEAN, STD = [0.3], [0.4]  # digits' statistics, pixel units


def digit_tensors(n: int = 96, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    x = torch.tensor(d.images[start:start + n], dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target[start:start + n], dtype=torch.long)


class DictDigits(Dataset):
    """A user's data set returning one dict per sample, with its index."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i], "index": i, "source": "digits"}


class WeightedDigits(DictDigits):
    """A user's data set returning ``(x, y, weight)``."""

    def __getitem__(self, i: int) -> tuple:
        return self.x[i], self.y[i], torch.tensor(0.5 + i % 2, dtype=torch.float32)


class PlainDigits(DictDigits):
    def __getitem__(self, i: int) -> tuple:
        return self.x[i], self.y[i]


def module(net: nn.Module, **kwargs) -> AdversarialSelectionModule:
    return AdversarialSelectionModule(net, recipe="ds", p_up=0.5, train_attack=ATTACK, eval_attack=EVAL,
                                      optimizer=lambda p: torch.optim.SGD(p, lr=0.1), **kwargs)


def trainer(tmp_path, callbacks=(), **kwargs) -> L.Trainer:
    defaults = {"max_epochs": 1, "limit_train_batches": 3, "num_sanity_val_steps": 0}
    return L.Trainer(default_root_dir=tmp_path, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", devices=1, deterministic=True,
                     callbacks=list(callbacks), **{**defaults, **kwargs})


def fit_with_callbacks(data: type[Dataset], tmp_path, net: nn.Module, **module_kwargs):
    """Fit on the first 96 digits with data set class ``data`` (val: the next 64); return module, trainer, callbacks."""
    x, y = digit_tensors()
    xv, yv = digit_tensors(64, start=96)
    callbacks = [MinimumPerturbation(probe_size=8, num_eps=2, steps=1, max_train_rows=8), SelectionMakeup()]
    m = module(copy.deepcopy(net), **module_kwargs)
    t = trainer(tmp_path, callbacks)
    t.fit(m, DataLoader(data(x, y), batch_size=32), DataLoader(data(xv, yv), batch_size=32))
    return m, t, callbacks


@pytest.mark.parametrize("data,kwargs", [(DictDigits, {"batch_keys": ("image", "label")}), (WeightedDigits, {})])
def test_dict_and_weighted_batches_train_and_feed_the_callbacks_exactly_as_plain_pairs(tmp_path, data, kwargs):
    torch.manual_seed(0)
    net = TinyNet()
    plain, plain_trainer, plain_callbacks = fit_with_callbacks(PlainDigits, tmp_path / "plain", net)
    other, other_trainer, other_callbacks = fit_with_callbacks(data, tmp_path / "other", net, **kwargs)

    assert other_trainer.global_step == plain_trainer.global_step == 3
    for a, b in zip(plain.model.state_dict().values(), other.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert set(other_trainer.callback_metrics) == set(plain_trainer.callback_metrics)
    for key, value in plain_trainer.callback_metrics.items():
        if key == EPOCH_SECONDS:  # wall clock
            continue
        assert torch.equal(other_trainer.callback_metrics[key], value), key
    assert "minperturb/mean" in other_trainer.callback_metrics
    assert "selection/n_adv" in other_trainer.callback_metrics
    assert other_callbacks[0].history[-1]["eps"] == plain_callbacks[0].history[-1]["eps"]
    # The last batch holds digits 64..95: a dict's "index" entry reaches the record, a float weight is no index.
    index = other.last_selection.index
    if data is DictDigits:
        assert torch.equal(index, torch.arange(64, 96))
    else:
        assert index is None


def test_minimum_perturbation_probes_the_data_modules_validation_set_when_the_first_epoch_does_not_validate(
        tmp_path):
    probe = MinimumPerturbation(probe_size=4, num_eps=2, steps=1, max_train_rows=4)
    t = trainer(tmp_path, [probe], limit_train_batches=1, check_val_every_n_epoch=2)
    dm = DigitsDataModule(batch_size=32)
    t.fit(module(TinyNet()), datamodule=dm)
    assert t.val_dataloaders is None  # the first epoch did not validate
    assert len(probe.history) == 1 and len(probe.history[0]["eps"]) == 4
    assert "minperturb/mean" in t.callback_metrics


def test_a_mapping_batch_without_the_named_keys_is_refused_naming_batch_keys_and_the_keys_present(tmp_path):
    x, y = digit_tensors(32)
    loader = DataLoader(DictDigits(x, y), batch_size=32)
    with pytest.raises(ValueError, match=r"`batch_keys`=\('img', 'label'\) names \['img'\] that the batch lacks; "
                                         r"the batch has keys \['image', 'label', 'index', 'source'\]"):
        trainer(tmp_path, limit_val_batches=0).fit(module(TinyNet(), batch_keys=("img", "label")), loader)
    with pytest.raises(ValueError, match=r"a mapping batch needs `batch_keys`=\(input key, label key\).*"
                                         r"\['image', 'label', 'index', 'source'\]"):
        trainer(tmp_path, limit_val_batches=0).fit(module(TinyNet()), loader)


@pytest.mark.parametrize("kwargs,match", [
    ({"batch_keys": ("image",)}, r"`batch_keys` must be two different keys .*got \('image',\)"),
    ({"batch_keys": ("x", "x")}, r"`batch_keys` must be two different keys .*got \('x', 'x'\)"),
    ({"input_normalization": ([0.5, 0.5], [0.2])}, r"`input_normalization` \(mean, std\): `mean` and `std` must "
                                                r"have one entry per channel, got 2 means .* 1 stds"),
    ({"input_normalization": ([0.5], [0.0])}, r"`input_normalization` \(mean, std\): `std` entries must be > 0, got "
                                             r"\[0.0\]"),
    ({"input_normalization": ([0.5], [float("nan")])}, r"`input_normalization` \(mean, std\): `std` must be finite "
                                                       r"numbers"),
    ({"input_normalization": [0.5, 0.2]}, r"`input_normalization` must be a pair \(mean, std\).*got \[0.5, 0.2\]"),
])
def test_bad_batch_keys_and_input_normalization_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        module(TinyNet(), **kwargs)


class Recorder:
    """The inputs and outputs of ``net``'s forward calls."""

    def __init__(self, net: nn.Module) -> None:
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        net.register_forward_hook(self._record)

    def _record(self, net: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self.inputs.append(args[0].detach())
        self.outputs.append(out.detach())


def test_normalized_data_with_input_normalization_trains_and_attacks_as_a_pixel_model_with_normalize_inside(
        tmp_path):
    x, y = digit_tensors()
    xv, yv = digit_tensors(32, start=96)
    torch.manual_seed(0)
    net = TinyNet()

    pixel_net = copy.deepcopy(net)
    pixel = module(nn.Sequential(Normalize(MEAN, STD), pixel_net))
    trainer(tmp_path / "pixel").fit(pixel, DataLoader(PlainDigits(x, y), batch_size=32),
                                    DataLoader(PlainDigits(xv, yv), batch_size=32))

    def normalized(t: torch.Tensor) -> torch.Tensor:  # what the user's data module yields
        return (t - MEAN[0]) / STD[0]

    norm = module(copy.deepcopy(net), input_normalization=(MEAN, STD))
    fitted = trainer(tmp_path / "norm")
    fitted.fit(norm, DataLoader(PlainDigits(normalized(x), y), batch_size=32),
               DataLoader(PlainDigits(normalized(xv), yv), batch_size=32))
    assert type(norm.model) is TinyNet  # module.model stays the user's network, on normalized inputs
    for a, b in zip(pixel_net.state_dict().values(), norm.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    fitted.save_checkpoint(tmp_path / "norm.ckpt")
    loaded = AdversarialSelectionModule.load_from_checkpoint(tmp_path / "norm.ckpt", model=TinyNet())

    # Validation of the trained weights: the same adversarial logits, and the attack stays within eps in pixels.
    seen = {}
    for name, m, data in (("pixel", pixel, xv), ("norm", norm, normalized(xv)), ("loaded", loaded, normalized(xv))):
        rec = Recorder(pixel_net if m is pixel else m.model)
        trainer(tmp_path / name, limit_val_batches=1).validate(m, DataLoader(PlainDigits(data, yv), batch_size=32),
                                                               verbose=False)
        seen[name] = rec
    torch.testing.assert_close(seen["norm"].outputs[-1], seen["pixel"].outputs[-1])
    assert torch.equal(seen["loaded"].outputs[-1], seen["norm"].outputs[-1])
    adv_pixels = seen["norm"].inputs[-1] * STD[0] + MEAN[0]  # the network saw them normalized
    assert float((adv_pixels - xv).abs().max()) <= EVAL.eps + 1e-5
    assert float((adv_pixels - xv).abs().max()) > EVAL.eps / 2  # it did attack


def test_input_normalization_is_a_list_of_lists_on_the_command_line(tmp_path):
    cli = build_cli([*config_args("digits/base.yaml", "recipes/ds.yaml"), "--trainer.logger", "false",
                     "--model.init_args.input_normalization", "[[0.3], [0.4]]"], run=False)
    normalize = cli.model.input_normalization
    assert normalize.mean.flatten().tolist() == pytest.approx(MEAN)
    assert normalize.std.flatten().tolist() == pytest.approx(STD)


def test_each_validation_and_test_loader_has_its_own_accuracies_and_one_loader_keeps_the_plain_keys(tmp_path):
    torch.manual_seed(0)
    x, y = digit_tensors(64)
    m = module(TinyNet())
    trainer(tmp_path, limit_train_batches=4, max_epochs=3).fit(m, DataLoader(PlainDigits(*digit_tensors(256)),
                                                                             batch_size=64))
    clean = DataLoader(PlainDigits(x, y), batch_size=32)
    shifted = DataLoader(PlainDigits(x, (y + 1) % 10), batch_size=32)  # other labels: other accuracies

    def validate(loaders, stage="validate"):
        return getattr(trainer(tmp_path), stage)(m, loaders, verbose=False)

    alone = [validate(clean)[0], validate(shifted)[0]]
    assert set(alone[0]) == {"val/acc_clean", "val/acc_robust", "val/loss_clean"}
    both = validate([clean, shifted])
    for i, result in enumerate(both):
        assert result == {f"{key}/dataloader_idx_{i}": value for key, value in alone[i].items()}
    assert alone[0]["val/acc_clean"] != alone[1]["val/acc_clean"]

    tested = validate([clean, shifted], "test")
    assert tested[1]["test/acc_robust/dataloader_idx_1"] == alone[1]["val/acc_robust"]
    assert set(validate(clean, "test")[0]) == {"test/acc_clean", "test/acc_robust", "test/loss_clean"}


def test_the_clean_loss_of_an_evaluation_is_the_mean_over_its_rows_whatever_the_batch_sizes(tmp_path):
    torch.manual_seed(0)
    x, y = digit_tensors(64)
    m = module(TinyNet())
    (result,) = trainer(tmp_path).validate(m, DataLoader(PlainDigits(x, y), batch_size=24), verbose=False)  # 24+24+16
    with torch.no_grad():
        expected = F.cross_entropy(m.model.eval()(x), y)
    assert result["val/loss_clean"] == pytest.approx(float(expected), rel=1e-6)

    class NanOnFirstRow(nn.Module):  # a diverged network: one row's logits are not finite
        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            logits = m.model(inputs)
            return torch.cat([torch.full_like(logits[:1], float("nan")), logits[1:]])

    diverged_module = AdversarialSelectionModule(NanOnFirstRow(), recipe="ds", train_attack=ATTACK, eval_attack=None)
    (diverged,) = trainer(tmp_path).validate(diverged_module, DataLoader(PlainDigits(x, y), batch_size=24),
                                             verbose=False)
    assert math.isnan(diverged["val/loss_clean"])  # shown, not averaged away


def test_adaptive_p_up_follows_the_robust_accuracy_of_one_of_several_validation_loaders(tmp_path):
    x, y = digit_tensors(64)
    clean = DataLoader(PlainDigits(x, y), batch_size=32)
    shifted = DataLoader(PlainDigits(x, (y + 1) % 10), batch_size=32)
    adaptive = AdaptivePUp(monitor="val/acc_robust/dataloader_idx_1")
    t = trainer(tmp_path, [adaptive], limit_train_batches=1, max_epochs=2)
    t.fit(module(TinyNet()), DataLoader(PlainDigits(*digit_tensors(64)), batch_size=32), [clean, shifted])
    assert len(adaptive.accs) == 2
    assert adaptive.accs[-1] == float(t.callback_metrics["val/acc_robust/dataloader_idx_1"])


class TwoValidationLoaders(DigitsDataModule):
    """The package's digits with a second validation loader whose labels are shifted (other accuracies)."""

    def val_dataloader(self) -> list[DataLoader]:
        clean = super().val_dataloader()
        x, y = next(iter(clean))
        return [clean, DataLoader(PlainDigits(x, (y + 1) % 10), batch_size=64)]


def test_the_command_line_prints_one_accuracy_line_per_validation_loader(tmp_path, capsys):
    build_cli(["validate", *config_args("digits/base.yaml", "recipes/ds.yaml"),
               "--data", "test_batches.TwoValidationLoaders", "--trainer.logger", "false",
               "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
               "--model.init_args.eval_attack.steps", "2"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "accuracy: clean" in line]
    assert [line.split(" accuracy")[0] for line in lines] == ["val loader 0", "val loader 1"]
    assert all("robust" in line for line in lines)
