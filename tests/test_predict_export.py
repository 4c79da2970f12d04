"""Taking the result away: predictions (``trainer.predict``, ``lightning-advsel predict``) and the classifier
exported to a file that loads without the package (``export_model``, ``lightning-advsel export``)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import MAIN_JOB, config_args
from torch import nn

from lightning_advsel import AdversarialSelectionModule, AttackConfig
from lightning_advsel.cli import build_cli, main
from lightning_advsel.data import DigitsDataModule
from lightning_advsel.export import export_model
from lightning_advsel.models import SmallCNN

SHORT_FIT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
             "--trainer.enable_progress_bar", "false", "--model.init_args.train_attack.steps", "1",
             "--model.init_args.eval_attack.steps", "1"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, Path]:
    """A checkpoint of a short CLI fit of the main job on digits, and the folder its logs are under."""
    logs = tmp_path_factory.mktemp("logs")
    cli = build_cli(["fit", *config_args(*MAIN_JOB), *SHORT_FIT, "--trainer.logger.init_args.save_dir", str(logs)])
    return Path(cli.trainer.checkpoint_callback.last_model_path), logs


def test_trainer_predict_returns_the_models_classes_and_the_attacked_ones_behind_test_acc_robust(tmp_path):
    torch.manual_seed(0)
    attack = AttackConfig(eps=0.1, alpha=0.05, steps=2)
    net = SmallCNN(in_channels=1, input_size=8)
    module = AdversarialSelectionModule(net, eval_attack=attack, predict_attack=attack)
    data = DigitsDataModule(batch_size=64)
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=3, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    batches = trainer.predict(module, datamodule=data)
    x, y = data.test_set.tensors
    module.model.eval()
    with torch.no_grad():
        expected = module.model(x).argmax(dim=1)
    pred = torch.cat([b["pred"] for b in batches])
    assert pred.shape == (len(y),) and torch.equal(pred, expected)
    assert torch.cat([b["logits"] for b in batches]).shape == (len(y), 10)
    # The attacked rows are the test attack's own: same seeds per batch, so the same robust accuracy.
    tested = trainer.test(module, datamodule=data, verbose=False)[0]
    pred_adv = torch.cat([b["pred_adv"] for b in batches])
    assert (pred_adv == y).float().mean().item() == pytest.approx(tested["test/acc_robust"], abs=1e-6)
    assert (pred == y).float().mean().item() == pytest.approx(tested["test/acc_clean"], abs=1e-6)


def test_predict_from_the_command_line_writes_one_row_per_test_image(fitted, tmp_path):
    ckpt, _ = fitted
    cli = build_cli(["predict", *config_args(*MAIN_JOB), "--ckpt_path", str(ckpt),
                     "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path),
                     "--model.init_args.predict_attack.steps", "2"])
    written = sorted(p.name for p in tmp_path.rglob("predictions.*"))
    assert written == ["predictions.csv", "predictions.pt"]
    with open(next(tmp_path.rglob("predictions.csv"))) as f:
        rows = list(csv.DictReader(f))
    test_x, test_y = cli.datamodule.test_set.tensors
    assert [int(r["index"]) for r in rows] == list(range(len(test_y)))
    assert [int(r["label"]) for r in rows] == test_y.tolist()
    # The checkpoint's weights, whatever the module the configs built.
    model = AdversarialSelectionModule.load_from_checkpoint(ckpt).model.eval()
    with torch.no_grad():
        assert [int(r["pred"]) for r in rows] == model(test_x).argmax(dim=1).tolist()
    # `predict_attack` on the command line survives the checkpoint's hyperparameters.
    assert all(r["pred_adv"] in {str(c) for c in range(10)} for r in rows)
    saved = torch.load(next(tmp_path.rglob("predictions.pt")), weights_only=True)
    assert saved["logits_adv"].shape == (len(test_y), 10)


def test_a_test_attack_given_with_a_checkpoint_is_the_one_tested(fitted, tmp_path, capsys):
    ckpt, _ = fitted
    build_cli(["test", *config_args(*MAIN_JOB), "--ckpt_path", str(ckpt), "--trainer.logger", "false",
               "--trainer.default_root_dir", str(tmp_path), "--trainer.limit_test_batches", "1",
               "--trainer.enable_progress_bar", "false", "--model.init_args.test_attack.steps", "2",
               "--model.init_args.test_attack.eps", "0.05"])
    assert "(PGD-2 linf eps=0.05" in capsys.readouterr().out


# Run with `python -I` from an empty folder, lightning_advsel blocked even if installed: only torch is there.
LOAD_WITHOUT_PACKAGE = """
import sys
sys.modules["lightning_advsel"] = None  # an installed copy must not be found either
import torch
try:
    import lightning_advsel
except ImportError:
    pass
else:
    raise SystemExit("lightning_advsel was importable")
fmt, exported, inputs, out = sys.argv[1:]
x = torch.load(inputs, weights_only=True)
if fmt == "torch_export":
    result = torch.export.load(exported).module()(x)
else:
    result = torch.load(exported, weights_only=True)
torch.save(result, out)
"""


@pytest.mark.parametrize("fmt,name", [("state_dict", "weights.pt"), ("torch_export", "classifier.pt2")])
def test_the_exported_classifier_loads_without_the_package_and_predicts_as_the_module(fitted, tmp_path, fmt, name):
    ckpt, _ = fitted
    out = tmp_path / "export" / name
    main(["export", *config_args(*MAIN_JOB), "--ckpt_path", str(ckpt), "--out", str(out), "--format", fmt])
    module = AdversarialSelectionModule.load_from_checkpoint(ckpt).eval()
    data = DigitsDataModule()
    data.setup("predict")
    x = data.test_set.tensors[0][:5]
    torch.save(x, tmp_path / "x.pt")
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITHOUT_PACKAGE)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run([sys.executable, "-I", str(script), fmt, str(out), str(tmp_path / "x.pt"),
                             str(tmp_path / "result.pt")], cwd=empty, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(tmp_path / "result.pt", weights_only=True)
    with torch.no_grad():
        expected = module(x)
        if fmt == "state_dict":  # plain keys: they load into the bare network
            assert set(loaded) == set(module.model.state_dict())
            net = SmallCNN(in_channels=1, input_size=8, mean=[0.3], std=[0.4])
            net.load_state_dict(loaded)
            loaded = net.eval()(x)
    assert torch.allclose(loaded, expected, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"format": "torchscript"}, r"`format` must be one of .*'state_dict', 'torch_export'.*got 'torchscript'"),
        ({"format": "torch_export"}, r"`format`='torch_export' needs `example_input`"),
        ({"format": "torch_export", "example_input": torch.rand(2, 1, 8, 8), "path": "m.pt"},
         r"must end in .pt2.*m.pt'"),
        ({"format": "torch_export", "example_input": torch.rand(2, 1, 8, 8), "model": "data-dependent"},
         r"`format`='torch_export' cannot capture DataDependent .*export `format`='state_dict' instead"),
    ],
)
def test_bad_export_requests_are_refused_naming_the_format(tmp_path, kwargs, match):
    model = DataDependent() if kwargs.pop("model", None) else SmallCNN(in_channels=1, input_size=8)
    path = tmp_path / kwargs.pop("path", "m.pt2")
    with pytest.raises(ValueError, match=match):
        export_model(model, path, **kwargs)
    assert not path.exists()


class DataDependent(nn.Module):
    """Branches on a value of its input: torch.export cannot capture that."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(x.flatten(1))
        return out if float(out.sum()) > 0 else -out
