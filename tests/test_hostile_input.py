"""Hostile input, tried: every public constructor, the attack and the CLI refuse bad values before training.

Each case is ``(id, call, expected error, message regex)``; the message must name the argument, the value
received and what is expected. ``CALLBACK_CASES`` is the same table for the callbacks (extended where the
callbacks live).
"""

from __future__ import annotations

import gzip
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import MAIN_JOB, TinyNet, config_args, tiny_batch
from torch import nn

from lightning_advsel import AdversarialSelectionModule, AttackConfig, pgd
from lightning_advsel.callbacks import AdaptivePUp, MinimumPerturbation, PaperFigures
from lightning_advsel.cli import build_cli
from lightning_advsel.data import CIFAR10DataModule, DigitsDataModule, MNISTDataModule
from lightning_advsel.models import PreActResNet18, ResNet18, SmallCNN

NAN, INF = math.nan, math.inf


def module(**kwargs) -> Callable[[], object]:
    return lambda: AdversarialSelectionModule(**{"model": TinyNet(), **kwargs})


def attack(**kwargs) -> Callable[[], object]:
    return lambda: AttackConfig(**kwargs)


class VectorOut(nn.Module):
    """Returns one number per sample instead of logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).sum(1)


def run_pgd(x=None, y=None, model=None, **kwargs) -> Callable[[], object]:
    def call():
        bx, by = tiny_batch(4)
        settings = {"eps": 0.1, "alpha": 0.05, "steps": 1, **kwargs}
        return pgd(model or TinyNet(), bx if x is None else x(bx), by if y is None else y(by), **settings)
    return call


def write_mnist(root: Path, images: int) -> Path:
    """A torchvision-layout MNIST folder with ``images`` training and test images (gzipped IDX files)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        head = (0x803).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (images, 28, 28))
        (raw / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(head + bytes(images * 784)))
        head = (0x801).to_bytes(4, "big") + images.to_bytes(4, "big")
        (raw / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(head + bytes(images)))
    return root


def mnist_setup(tmp_path: Path, images: int, **kwargs) -> None:
    MNISTDataModule(data_dir=str(write_mnist(tmp_path, images)), **kwargs).setup("fit")


E = ValueError
CASES: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    # AdversarialSelectionModule
    ("module-p_up-str", module(p_up="0.5"), E, r"`p_up` must be a number in \(0, 1\], got '0.5'"),
    ("module-p_up-nan", module(p_up=NAN), E, r"`p_up` must be a number in \(0, 1\], got nan"),
    ("module-p_up-negative", module(p_up=-0.1), E, r"`p_up` must be in \(0, 1\], got -0.1"),
    ("module-p_up-zero", module(p_up=0), E, r"`p_up` must be in \(0, 1\], got 0"),
    ("module-p_up-above-one", module(p_up=1.5), E, r"`p_up` must be in \(0, 1\], got 1.5"),
    ("module-p_up-bool", module(p_up=True), E, r"`p_up` must be a number in \(0, 1\], got True"),
    ("module-attack_frac-two", module(attack_frac=2), E, r"`attack_frac` must be in \(0, 1\], got 2"),
    ("module-attack_frac-inf", module(attack_frac=INF), E, r"`attack_frac` must be a number in \(0, 1\], got inf"),
    ("module-recipe-unknown", module(recipe="madry"), E, r"`recipe` must be one of .*got 'madry'"),
    ("module-recipe-int", module(recipe=3), E, r"`recipe` must be one of .*got 3"),
    ("module-attack_score", module(attack_score="entropy"), E, r"`attack_score` must be one of .*got 'entropy'"),
    ("module-num_classes-one", module(num_classes=1), E, r"`num_classes` must be an integer >= 2, got 1"),
    ("module-num_classes-float", module(num_classes=2.5), E, r"`num_classes` must be an integer >= 2, got 2.5"),
    ("module-num_classes-str", module(num_classes="10"), E, r"`num_classes` must be an integer >= 2, got '10'"),
    ("module-seed-negative", module(seed=-1), E, r"`seed` must be an integer >= 0, got -1"),
    ("module-seed-float", module(seed=1.5), E, r"`seed` must be an integer >= 0, got 1.5"),
    ("module-scoring_mode", module(scoring_mode="half"), E, r"`scoring_mode` must be one of .*got 'half'"),
    ("module-scheduler_interval", module(scheduler_interval="batch"), E,
     r"`scheduler_interval` must be one of \('epoch', 'step'\), got 'batch'"),
    ("module-selection_scope", module(selection_scope="world"), E,
     r"`selection_scope` must be one of \('local', 'global'\), got 'world'"),
    ("module-nonfinite", module(nonfinite="ignore"), E,
     r"`nonfinite` must be one of \('raise', 'skip'\), got 'ignore'"),
    ("module-gradient_clip_val-negative", module(gradient_clip_val=-1.0), E,
     r"`gradient_clip_val` must be a finite number >= 0.0, got -1.0"),
    ("module-gradient_clip_algorithm", module(gradient_clip_algorithm="l2"), E,
     r"`gradient_clip_algorithm` must be one of \('norm', 'value'\), got 'l2'"),
    ("module-accumulate_grad_batches-zero", module(accumulate_grad_batches=0), E,
     r"`accumulate_grad_batches` must be an integer >= 1, got 0"),
    ("module-model-str", module(model="resnet"), E, r"`model` must be an nn.Module classifier, got str"),
    ("module-model-none", module(model=None), E, r"`model` must be an nn.Module classifier, got NoneType"),
    ("module-train_attack-key", module(train_attack={"epsilon": 0.1}), E, r"`train_attack` has an unknown key"),
    ("module-train_attack-float", module(train_attack=0.1), E,
     r"`train_attack` must be an AttackConfig or a dict of its fields, got float"),
    ("module-train_attack-eps-above-pixels", module(train_attack={"eps": 2.0}), E,
     r"`eps` must be <= 1 for the linf norm: pixels lie in \[0, 1\], got 2.0"),
    ("module-eval_attack-norm", module(eval_attack={"norm": "l1"}), E, r"`norm` must be one of .*got 'l1'"),
    # AttackConfig
    ("attack-eps-nan", attack(eps=NAN), E, r"`eps` must be a finite number >= 0 \(pixel units\), got nan"),
    ("attack-eps-negative", attack(eps=-0.1), E, r"`eps` must be a finite number >= 0 \(pixel units\), got -0.1"),
    ("attack-eps-above-pixels", attack(eps=1.5), E, r"`eps` must be <= 1 for the linf norm.*got 1.5"),
    ("attack-eps-str", attack(eps="0.1"), E, r"`eps` must be a finite number >= 0 \(pixel units\), got '0.1'"),
    ("attack-alpha-negative", attack(alpha=-1), E, r"`alpha` must be a finite number >= 0 \(pixel units\), got -1"),
    ("attack-alpha-inf", attack(alpha=INF), E, r"`alpha` must be a finite number >= 0 \(pixel units\), got inf"),
    ("attack-steps-zero", attack(steps=0), E, r"`steps` must be an integer >= 1, got 0"),
    ("attack-steps-float", attack(steps=2.5), E, r"`steps` must be an integer >= 1, got 2.5"),
    ("attack-restarts-zero", attack(restarts=0), E, r"`restarts` must be an integer >= 1, got 0"),
    ("attack-norm", attack(norm="l1"), E, r"`norm` must be one of \('linf', 'l2'\), got 'l1'"),
    ("attack-mode", attack(mode="test"), E, r"`mode` must be one of \('eval', 'train', 'keep'\), got 'test'"),
    # pgd
    ("pgd-x-nan", run_pgd(x=lambda x: x.index_fill(0, torch.tensor([1]), NAN)), E,
     r"`x` must hold finite pixels in \[0, 1\].*with NaN or inf"),
    ("pgd-x-out-of-range", run_pgd(x=lambda x: x * 255), E, r"`x` must hold finite pixels in \[0, 1\].*got values in"),
    ("pgd-y-above-classes", run_pgd(y=lambda y: y.fill_(10)), E,
     r"`y` must hold class indices below the model's 10 classes, got 10"),
    ("pgd-y-negative", run_pgd(y=lambda y: y.fill_(-1)), E, r"`y` must hold class indices >= 0, got -1"),
    ("pgd-y-float", run_pgd(y=lambda y: y.float()), E,
     r"`y` must be integer labels of shape \(4,\), got torch.float32"),
    ("pgd-y-shape", run_pgd(y=lambda y: y[:2]), E, r"`y` must be integer labels of shape \(4,\), got .*\(2,\)"),
    ("pgd-l2-eps-above-cube", run_pgd(eps=100.0, norm="l2"), E, r"`eps` must be at most sqrt\(64\) = 8 .*got 100.0"),
    ("pgd-model-wrong-shape", run_pgd(model=VectorOut()), E,
     r"`model` must return logits of shape \(B, num_classes\) = \(4, K\), got \(4,\)"),
    # models
    ("smallcnn-input_size", lambda: SmallCNN(input_size=10), E, r"`input_size` must be a multiple of 4.*got 10"),
    ("smallcnn-in_channels-zero", lambda: SmallCNN(in_channels=0), E,
     r"`in_channels` must be an integer >= 1, got 0"),
    ("smallcnn-width-negative", lambda: SmallCNN(width=-1), E, r"`width` must be an integer >= 1, got -1"),
    ("smallcnn-std-zero", lambda: SmallCNN(std=(0.0,)), E, r"`std` entries must be > 0, got \[0.0\]"),
    ("smallcnn-mean-std-length", lambda: SmallCNN(mean=(0.5, 0.5), std=(0.5,)), E,
     r"`mean` and `std` must have one entry per channel"),
    ("resnet18-num_classes-zero", lambda: ResNet18(num_classes=0), E,
     r"`num_classes` must be an integer >= 1, got 0"),
    ("resnet18-in_channels-str", lambda: ResNet18(in_channels="3"), E,
     r"`in_channels` must be an integer >= 1, got '3'"),
    ("preact-num_classes-negative", lambda: PreActResNet18(num_classes=-1), E,
     r"`num_classes` must be an integer >= 1, got -1"),
    # data modules
    ("digits-batch_size-zero", lambda: DigitsDataModule(batch_size=0), E,
     r"`batch_size` must be an integer >= 1, got 0"),
    ("digits-batch_size-str", lambda: DigitsDataModule(batch_size="64"), E,
     r"`batch_size` must be an integer >= 1, got '64'"),
    ("digits-batch_size-above-train-set", lambda: DigitsDataModule(batch_size=2000), E,
     r"`batch_size` must be at most the 1257 training digits, got 2000"),
    ("digits-val_size-zero", lambda: DigitsDataModule(val_size=0), E, r"`val_size` must be an integer >= 1, got 0"),
    ("digits-splits-leave-no-train", lambda: DigitsDataModule(val_size=1000, test_size=800), E,
     r"`val_size` \+ `test_size` must leave training data out of 1797 digits, got 1000 \+ 800"),
    ("digits-num_workers-negative", lambda: DigitsDataModule(num_workers=-1), E,
     r"`num_workers` must be an integer >= 0, got -1"),
    ("digits-split_seed-negative", lambda: DigitsDataModule(split_seed=-1), E,
     r"`split_seed` must be an integer >= 0, got -1"),
    ("mnist-data_dir-empty", lambda: MNISTDataModule(data_dir=""), E, r"`data_dir` must be a folder path, got ''"),
    ("mnist-val_size-negative", lambda: MNISTDataModule(val_size=-5), E, r"`val_size` must be an integer >= 1, got -5"),
    ("mnist-batch_size-float", lambda: MNISTDataModule(batch_size=1.5), E,
     r"`batch_size` must be an integer >= 1, got 1.5"),
    ("cifar-val_size-zero", lambda: CIFAR10DataModule(val_size=0), E, r"`val_size` must be an integer >= 1, got 0"),
    ("cifar-num_workers-negative", lambda: CIFAR10DataModule(num_workers=-2), E,
     r"`num_workers` must be an integer >= 0, got -2"),
]

# Cases that need a folder on disk: ``call(tmp_path)``.
DISK_CASES: list[tuple[str, Callable[[Path], object], type[Exception], str]] = [
    ("mnist-empty-data-set", lambda p: mnist_setup(p, 0, val_size=1), E, r"MNISTDataModule found an empty data set"),
    ("mnist-batch_size-above-train-set", lambda p: mnist_setup(p, 20, val_size=5, batch_size=64), E,
     r"`batch_size` must be at most the 15 training samples, got 64"),
    ("mnist-val_size-above-train-set", lambda p: mnist_setup(p, 20, val_size=20), E,
     r"`val_size` must be below the 20 training images of MNIST, got 20"),
]

CLI_CASES: list[tuple[str, list[str], type[Exception], str]] = [
    ("cli-p_up-above-one", ["--model.init_args.p_up", "1.5"], E, r"`p_up` must be in \(0, 1\], got 1.5"),
    # jsonargparse itself refuses a value of the wrong type: it prints the key and the value and exits 2.
    ("cli-p_up-nan", ["--model.init_args.p_up", "nan"], SystemExit, r'(?s)Parser key "p_up".*Given value: nan'),
    ("cli-steps-str", ["--model.init_args.train_attack.steps", "ten"], SystemExit, r"(?s)steps.*ten"),
    ("cli-eps-above-pixels", ["--model.init_args.train_attack.eps", "2.0"], E,
     r"`eps` must be <= 1 for the linf norm.*got 2.0"),
    # A choice outside its Literal type: jsonargparse names the key, the allowed values and the value given.
    ("cli-selection_scope", ["--model.init_args.selection_scope", "world"], SystemExit,
     r"(?s)Parser key \"selection_scope\".*\['local', 'global'\]\. Got value: world"),
    ("cli-nonfinite", ["--model.init_args.nonfinite", "ignore"], SystemExit,
     r"(?s)Parser key \"nonfinite\".*\['raise', 'skip'\]\. Got value: ignore"),
    # Lightning refuses these Trainer arguments under manual optimization; the module takes them instead.
    ("cli-trainer-gradient_clip_val", ["--trainer.gradient_clip_val", "1.0"], E,
     r"`Trainer\(gradient_clip_val=1.0\)` does not apply.*`model.init_args.gradient_clip_val: 1.0`"),
    ("cli-trainer-accumulate_grad_batches", ["--trainer.accumulate_grad_batches", "4"], E,
     r"`Trainer\(accumulate_grad_batches=4\)` does not apply.*`model.init_args.accumulate_grad_batches: 4`"),
    ("cli-recipe-unknown", ["--model.init_args.recipe", "bogus"], SystemExit,
     r"(?s)Parser key \"recipe\".*\['standard', 'robust', 'ds', 'random', 'selective', 'selective_ds'\]\. "
     r"Got value: bogus"),
    ("cli-train_attack-norm", ["--model.init_args.train_attack.norm", "l1"], SystemExit,
     r"(?s)Parser key \"norm\".*\['linf', 'l2'\]\. Got value: l1"),
    ("cli-subset_keep", ["--data.init_args.subset_keep", "middle"], SystemExit,
     r"(?s)Parser key \"subset_keep\".*\['stable', 'unstable'\]\. Got value: middle"),
    ("cli-batch_size-above-train-set", ["--data.init_args.batch_size", "5000"], E,
     r"`batch_size` must be at most the 1257 training digits, got 5000"),
    ("cli-val_size-zero", ["--data.init_args.val_size", "0"], E, r"`val_size` must be an integer >= 1, got 0"),
    ("cli-model-wrong-num_classes", ["--model.init_args.model.init_args.num_classes", "5"], E,
     r"`model` must return logits of shape \(batch, num_classes\) = \(1, 10\).*got \(1, 5\)"),
]

def fit_with(callback: Callable[[], object], val_size: int = 30) -> Callable[[], object]:
    """Fit one epoch of digits with ``callback``; the error must come before the first optimizer step."""
    def call():
        import lightning as L

        trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[callback()])
        try:
            trainer.fit(AdversarialSelectionModule(TinyNet()), datamodule=DigitsDataModule(val_size=val_size))
        finally:
            assert trainer.global_step == 0, "the error came after training had started"
    return call


# Callback constructors and their fit-start checks: (id, call, error, regex).
CALLBACK_CASES: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    ("adaptive-mode-unknown", lambda: AdaptivePUp(mode="exp"), E, r"`mode` must be one of .*got 'exp'"),
    ("adaptive-monitor-empty", lambda: AdaptivePUp(monitor=""), E, r"`monitor` must be a non-empty .*got ''"),
    ("adaptive-min_p_up-zero", lambda: AdaptivePUp(min_p_up=0), E, r"`min_p_up` must be in \(0, 1\], got 0"),
    ("adaptive-min_p_up-nan", lambda: AdaptivePUp(min_p_up=NAN), E,
     r"`min_p_up` must be a number in \(0, 1\], got nan"),
    ("adaptive-initial-above-one", lambda: AdaptivePUp(initial_p_up=1.5), E,
     r"`initial_p_up` must be in \(0, 1\], got 1.5"),
    ("adaptive-initial-below-floor", lambda: AdaptivePUp(min_p_up=0.5, initial_p_up=0.2), E,
     r"`initial_p_up` must be >= `min_p_up`=0.5, got 0.2"),
    ("adaptive-monitor-missing", fit_with(lambda: AdaptivePUp(monitor="val/acc_nope")), E,
     r"`monitor`='val/acc_nope' is not among .*'train/acc'"),
    ("minperturb-probe_size-zero", lambda: MinimumPerturbation(probe_size=0), E,
     r"`probe_size` must be an integer >= 1, got 0"),
    ("minperturb-probe_size-str", lambda: MinimumPerturbation(probe_size="64"), E,
     r"`probe_size` must be an integer >= 1, got '64'"),
    ("minperturb-every-negative", lambda: MinimumPerturbation(every_n_epochs=-1), E,
     r"`every_n_epochs` must be an integer >= 1, got -1"),
    ("minperturb-steps-float", lambda: MinimumPerturbation(steps=2.5), E, r"`steps` must be an integer >= 1, got 2.5"),
    ("minperturb-max_eps-negative", lambda: MinimumPerturbation(max_eps=-0.1), E,
     r"`max_eps` must be a finite number > 0, got -0.1"),
    ("minperturb-max_eps-nan", lambda: MinimumPerturbation(max_eps=NAN), E,
     r"`max_eps` must be a finite number > 0, got nan"),
    ("minperturb-norm-unknown", lambda: MinimumPerturbation(norm="l1"), E, r"`norm` must be one of .*got 'l1'"),
    ("minperturb-mode-unknown", lambda: MinimumPerturbation(mode="test"), E, r"`mode` must be one of .*got 'test'"),
    ("minperturb-max_eps-above-pixel-range", fit_with(lambda: MinimumPerturbation(max_eps=1.5)), E,
     r"`max_eps` must be <= 1 for the linf norm.*got 1.5"),
    ("minperturb-probe-larger-than-val-set", fit_with(lambda: MinimumPerturbation(probe_size=31), val_size=30), E,
     r"`probe_size`=31 is larger than the validation set \(30 samples\)"),
    ("figures-dpi-zero", lambda: PaperFigures(dpi=0), E, r"`dpi` must be an integer >= 10, got 0"),
]


def ids(cases: list) -> list[str]:
    return [case[0] for case in cases]


@pytest.mark.parametrize("case_id,call,error,match", CASES, ids=ids(CASES))
def test_constructor_refuses_bad_value_naming_it(case_id, call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("case_id,call,error,match", DISK_CASES, ids=ids(DISK_CASES))
def test_data_module_refuses_bad_data_at_setup(tmp_path, case_id, call, error, match):
    with pytest.raises(error, match=match):
        call(tmp_path)


@pytest.mark.parametrize("case_id,override,error,match", CLI_CASES, ids=ids(CLI_CASES))
def test_cli_refuses_bad_value_before_any_training_step(tmp_path, capsys, case_id, override, error, match):
    steps = []
    with pytest.raises(error, match=None if error is SystemExit else match):
        cli = build_cli(["fit", *config_args(*MAIN_JOB), "--trainer.max_epochs", "1",
                         "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
                         "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
                         "--trainer.default_root_dir", str(tmp_path), *override])
        steps.append(cli.trainer.global_step)
    assert steps == [] and not any(tmp_path.rglob("*.ckpt"))
    if error is SystemExit:
        assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize("case_id,call,error,match",
                         CALLBACK_CASES, ids=ids(CALLBACK_CASES))
def test_callback_refuses_bad_value_naming_it(case_id, call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_case_count():
    """The table the closing note counts."""
    total = len(CASES) + len(DISK_CASES) + len(CLI_CASES) + len(CALLBACK_CASES)
    assert total >= 50
    assert len({*ids(CASES), *ids(DISK_CASES), *ids(CLI_CASES), *ids(CALLBACK_CASES)}) == total
