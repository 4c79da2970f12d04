"""AutoAttack as the test-time attack: the same numbers as the reference code (pyautoattack) and torchattacks
called directly, and the caller's state left alone."""

from __future__ import annotations

import itertools
import json
import math
import sys

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import MAIN_JOB, REPO, TinyNet, config_args, fit_steps, run_ranks, tiny_batch
from torch.utils.data import DataLoader, TensorDataset

from lightning_advsel import AdversarialSelectionModule, AttackConfig, AutoAttackConfig
from lightning_advsel.cli import build_cli
from lightning_advsel.data import DigitsDataModule
from lightning_advsel.evaluation import autoattack, autoattack_stages, batch_seed, stage_settings

torchattacks = pytest.importorskip("torchattacks", reason="needs the eval extra: pip install -e '.[eval]'")
pyautoattack = pytest.importorskip("pyautoattack", reason="needs the eval extra: pip install -e '.[eval]'")
from autoattack_budget import ITERATIONS, QUERIES, cut_reference_budget  # noqa: E402 - imports pyautoattack

IMPLEMENTATIONS = ("reference", "torchattacks")

EPS = 0.05  # L-inf radius, pixels: the fixture's model keeps about 3/4 of its test digits robust here


@pytest.fixture(scope="module")
def trained() -> tuple[TinyNet, torch.Tensor, torch.Tensor]:
    """A TinyNet fitted on the digits training split (100 full-batch Adam steps), and 64 test digits."""
    dm = DigitsDataModule()
    dm.setup()
    x, y = dm.train_set.tensors
    torch.manual_seed(0)
    net = TinyNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-2)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    x_test, y_test = dm.test_set.tensors
    return net, x_test[:64], y_test[:64]


def run_test(net: TinyNet, attack: AttackConfig | AutoAttackConfig, x: torch.Tensor, y: torch.Tensor,
                batch_size: int) -> dict[str, float]:
    """``trainer.test`` of ``net`` under ``test_attack=attack``: the logged metrics."""
    module = AdversarialSelectionModule(net, recipe="standard", test_attack=attack)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.test(module, DataLoader(TensorDataset(x, y), batch_size=batch_size), verbose=False)
    return metrics


class CappedSquare(torchattacks.Square):
    """torchattacks' Square with 100 queries instead of AutoAttack's 5000, counting the rows it attacks."""

    rows = 0

    def __init__(self, *args, **kwargs) -> None:
        kwargs["n_queries"] = 100
        super().__init__(*args, **kwargs)

    def forward(self, images, labels):  # noqa: ANN001, ANN201
        CappedSquare.rows += images.shape[0]
        return super().forward(images, labels)


@pytest.fixture
def small_budget(monkeypatch) -> None:
    """The reference's attacks at a few iterations and queries (the module and a direct call alike)."""
    cut_reference_budget(monkeypatch.setattr)


def test_module_autoattack_accuracy_equals_pyautoattack_called_directly_per_batch(trained, small_budget):
    net, x, y = trained
    x, y = x[:32], y[:32]
    attack = AutoAttackConfig(eps=EPS, seed=3)
    assert attack.implementation == "reference"  # the default
    metrics = run_test(net, attack, x, y, batch_size=16)
    robust = []
    for i, (xb, yb) in enumerate(zip(x.split(16), y.split(16), strict=True)):
        reference = pyautoattack.AutoAttack(net, norm="Linf", eps=EPS, version="standard", seed=batch_seed(3, i),
                                            device=xb.device)
        x_adv, _ = reference.run_standard_evaluation(xb, yb, batch_size=len(xb))
        with torch.no_grad():
            robust.append(net(x_adv).argmax(1) == yb)
        assert torch.equal(x_adv, attack(net, xb, yb, batch_idx=i, num_classes=10))
    assert metrics["test/acc_robust"] == pytest.approx(torch.cat(robust).float().mean().item(), abs=1e-7)
    assert 0 < metrics["test/acc_robust"] < metrics["test/acc_clean"]


def test_apgd_is_the_reference_standard_versions_first_two_attacks_and_stages_count_down(trained, small_budget):
    net, x, y = trained
    standard = autoattack_stages(net, x[:32], y[:32], eps=EPS, seed=1, num_classes=10)
    apgd = autoattack_stages(net, x[:32], y[:32], eps=EPS, seed=1, version="apgd", num_classes=10)
    assert list(standard.robust_after) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert list(apgd.robust_after) == ["apgd-ce", "apgd-t"]
    for stage in ("apgd-ce", "apgd-t"):
        assert torch.equal(apgd.robust_after[stage], standard.robust_after[stage])
    # Each stage attacks the rows still correct: the robust rows shrink stage by stage, from the clean ones.
    flags = [standard.clean, *standard.robust_after.values()]
    assert all(bool((after <= before).all()) for before, after in itertools.pairwise(flags))
    assert int(standard.clean.sum()) > int(standard.robust_after["square"].sum()) > 0
    with torch.no_grad():
        assert torch.equal(net(standard.x_adv).argmax(1) == y[:32], standard.robust_after["square"])


def test_each_stages_budget_is_read_off_the_library_and_named_in_the_description(small_budget):
    # Here the reference's budget is the test's; the libraries' own defaults are checked below without the cut.
    assert stage_settings("reference", "standard") == {
        "apgd-ce": {"iterations": ITERATIONS, "restarts": 1, "eot": 1},
        "apgd-t": {"iterations": ITERATIONS, "restarts": 1, "targets": 9},
        "fab-t": {"iterations": ITERATIONS, "restarts": 1, "targets": 9},
        "square": {"queries": QUERIES}}
    assert stage_settings("reference", "apgd", num_classes=5)["apgd-t"]["targets"] == 4  # min(9, classes - 1)


def test_the_reference_runs_100_iterations_and_torchattacks_10():
    ref, port = AutoAttackConfig(eps=0.1), AutoAttackConfig(eps=0.1, implementation="torchattacks")
    assert ref.describe() == ("AutoAttack standard (reference: APGD-CE 100 it., APGD-T 100 it., FAB-T 100 it., "
                              "Square 5000 queries) linf eps=0.1 seed=0")
    assert port.describe() == ("AutoAttack standard (torchattacks: APGD-CE 10 it., APGD-T 10 it., FAB-T 10 it., "
                               "Square 5000 queries) linf eps=0.1 seed=0")
    assert AutoAttackConfig(eps=0.1, version="rand").describe().startswith(
        "AutoAttack rand (reference: APGD-CE 100 it. EOT 20, APGD-DLR 100 it. EOT 20)")
    assert stage_settings("reference", "apgd")["apgd-t"] == {"iterations": 100, "restarts": 1, "targets": 9}


def test_module_torchattacks_accuracy_equals_torchattacks_called_directly_on_the_same_batches(trained, monkeypatch):
    # Square's 5000 queries would take most of a minute here; both paths get the same 100-query Square.
    monkeypatch.setattr("torchattacks.Square", CappedSquare)
    monkeypatch.setattr("torchattacks.attacks.autoattack.Square", CappedSquare)
    net, x, y = trained
    x, y = x[:32], y[:32]
    metrics = run_test(net, AutoAttackConfig(eps=EPS, seed=3, implementation="torchattacks"), x, y, batch_size=16)
    assert CappedSquare.rows > 0, "no row reached Square: the test would not cover all four attacks"

    robust_standard, robust_apgd = [], []
    for i, (xb, yb) in enumerate(zip(x.split(16), y.split(16), strict=True)):
        attack = torchattacks.AutoAttack(net, norm="Linf", eps=EPS, version="standard", n_classes=10,
                                         seed=batch_seed(3, i))
        robust_standard.append(net(attack(xb, yb)).argmax(1) == yb)
        x_apgd = autoattack(net, xb, yb, eps=EPS, version="apgd", seed=batch_seed(3, i), implementation="torchattacks")
        robust_apgd.append(net(x_apgd).argmax(1) == yb)
    robust_standard, robust_apgd = torch.cat(robust_standard), torch.cat(robust_apgd)
    assert metrics["test/acc_robust"] == pytest.approx(robust_standard.float().mean().item(), abs=1e-7)
    assert 0 < metrics["test/acc_robust"] < metrics["test/acc_clean"]
    # "apgd" is the standard version's first two stages: every row the standard version leaves robust, it does.
    assert bool((robust_apgd | ~robust_standard).all())


def test_autoattack_accuracy_is_at_most_pgd20_accuracy(trained):
    net, x, y = trained
    aa = run_test(net, AutoAttackConfig(eps=EPS, version="apgd", implementation="torchattacks"), x, y, batch_size=32)
    pgd20 = run_test(net, AttackConfig(eps=EPS, alpha=EPS / 4, steps=20), x, y, batch_size=32)
    assert aa["test/acc_clean"] == pgd20["test/acc_clean"]
    assert 0 < aa["test/acc_robust"] <= pgd20["test/acc_robust"] < pgd20["test/acc_clean"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_global_random_state_parameters_and_trace_function_are_untouched_by_an_evaluation(trained, small_budget,
                                                                                          implementation):
    net, x, y = trained
    before = torch.get_rng_state()
    if implementation == "torchattacks":
        torchattacks.APGD(net, eps=EPS, seed=5)(x[:8], y[:8])
    else:
        pyautoattack.AutoAttack(net, eps=EPS, seed=5).run_standard_evaluation(x[:8], y[:8])
    assert not torch.equal(before, torch.get_rng_state()), "the library no longer reseeds: the fork is moot"

    for p in net.parameters():
        p.grad = torch.ones_like(p)
    grads = [p.grad.clone() for p in net.parameters()]
    before = torch.get_rng_state()
    cuda_before = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    tracer = sys.gettrace()
    autoattack(net, x[:8], y[:8], eps=EPS, version="standard", seed=5, implementation=implementation)
    assert torch.equal(before, torch.get_rng_state())
    if cuda_before is not None:
        assert torch.equal(cuda_before, torch.cuda.get_rng_state())
    # The reference backpropagates through the model: its parameters are frozen meanwhile, their .grad untouched.
    assert all(p.requires_grad and torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads, strict=True))
    assert sys.gettrace() is tracer  # the reference's dynamic-defence check sets its own and then clears it
    for p in net.parameters():
        p.grad = None


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_attack_runs_in_eval_mode_and_restores_every_submodules_mode(small_budget, implementation):
    torch.manual_seed(0)
    net = TinyNet(batchnorm=True)
    net.train()
    net.net[-1].eval()  # a mixed state, which a bare net.train() afterwards would not restore
    flags = [m.training for m in net.modules()]
    bn = net.net[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    seen: list[bool] = []
    net.register_forward_hook(lambda m, _i, _o: seen.append(any(s.training for s in m.modules())))
    x, y = tiny_batch(8)
    autoattack(net, x, y, eps=0.1, version="apgd", implementation=implementation)
    assert seen and not any(seen)
    assert [m.training for m in net.modules()] == flags
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == int(stats[2])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_examples_repeat_and_each_batch_index_gets_its_own_seed(trained, small_budget, implementation):
    net, x, y = trained
    x, y = x[:16], y[:16]
    attack = AutoAttackConfig(eps=EPS, version="apgd", seed=2, implementation=implementation)
    first = attack(net, x, y, batch_idx=1)
    assert torch.equal(first, attack(net, x, y, batch_idx=1))
    assert torch.equal(first, autoattack(net, x, y, eps=EPS, version="apgd", seed=batch_seed(2, 1),
                                         implementation=implementation))
    assert len({batch_seed(seed, b) for seed in range(3) for b in range(1000)}) == 3000
    assert (first - x).abs().max() <= EPS + 1e-6 and 0 <= float(first.min()) and float(first.max()) <= 1
    assert bool((net(first).argmax(1) != y).any())


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_inference_mode_and_autocast_give_the_same_examples(trained, small_budget, implementation):
    net, x, y = trained
    x, y = x[:16], y[:16]
    plain = autoattack(net, x, y, eps=EPS, version="apgd", implementation=implementation)
    with torch.inference_mode():
        inside = autoattack(net, x, y, eps=EPS, version="apgd", implementation=implementation)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = autoattack(net, x, y, eps=EPS, version="apgd", implementation=implementation)
    assert torch.equal(plain, inside) and torch.equal(plain, autocast)
    assert autocast.dtype == torch.float32


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_asking_for_autoattack_without_its_package_names_the_pip_command(monkeypatch, implementation):
    package = {"reference": "pyautoattack", "torchattacks": "torchattacks"}[implementation]
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(ImportError, match=rf"needs the optional package {package}.*pip install \"lightning-advsel"
                                          r"\[eval\]\""):
        AutoAttackConfig(eps=0.1, implementation=implementation)
    with pytest.raises(ImportError, match=rf"{package}.*pip install"):
        AdversarialSelectionModule(TinyNet(), test_attack={"eps": 0.1, "norm": "linf", "version": "apgd", "seed": 0,
                                                           "implementation": implementation})
    # Nothing else needs the extra.
    assert AdversarialSelectionModule(TinyNet(), test_attack=AttackConfig(steps=5)).test_attack.steps == 5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"eps": 0}, r"`eps` must be a finite number > 0 \(pixel units\), got 0"),
        ({"eps": -0.1}, r"`eps` must be a finite number > 0 .*got -0.1"),
        ({"eps": math.nan}, r"`eps` must be a finite number > 0 .*got nan"),
        ({"eps": "0.1"}, r"`eps` must be a finite number > 0 .*got '0.1'"),
        ({"eps": 2.0}, r"`eps` must be <= 1 for the linf norm.*got 2.0"),
        ({"eps": 0.1, "norm": "l1"}, r"`norm` must be one of \('linf', 'l2'\), got 'l1'"),
        ({"eps": 0.1, "version": "plus"}, r"`version` must be one of \('standard', 'apgd', 'rand'\), got 'plus'"),
        ({"eps": 0.1, "implementation": "torchattack"},
         r"`implementation` must be one of \('reference', 'torchattacks'\), got 'torchattack'"),
        ({"eps": 0.1, "seed": -1}, r"`seed` must be an integer >= 0, got -1"),
        ({"eps": 0.1, "seed": True}, r"`seed` must be an integer >= 0, got True"),
    ],
)
def test_bad_autoattack_settings_fail_at_construction_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoAttackConfig(**kwargs)


def test_bad_inputs_fail_before_the_attack_runs():
    net = TinyNet()
    x, y = tiny_batch(4)
    with pytest.raises(ValueError, match=r"`x` must have shape \(B, C, H, W\) for AutoAttack, got \(4, 64\)"):
        autoattack(torch.nn.Sequential(torch.nn.Flatten(), net), x.flatten(1), y, eps=0.1)
    with pytest.raises(ValueError, match=r"AutoAttack apgd needs a classifier of at least 4 classes .* got "
                                         r"`num_classes`=3"):
        autoattack(TinyNet(num_classes=3), x, y % 3, eps=0.1, version="apgd")
    with pytest.raises(ValueError, match=r"`x` must hold finite pixels in \[0, 1\]"):
        autoattack(net, x * 2, y, eps=0.1)
    with pytest.raises(ValueError, match=r"`test_attack` must be an AttackConfig, an AutoAttackConfig"):
        AdversarialSelectionModule(TinyNet(), test_attack="autoattack")


def test_checkpoint_keeps_plain_values_and_rebuilds_the_test_attack_type(tmp_path):
    x, y = tiny_batch(16)
    for attack in (AutoAttackConfig(eps=0.2, version="apgd", seed=4, implementation="torchattacks"),
                   AttackConfig(eps=0.2, steps=7), None):
        module = AdversarialSelectionModule(TinyNet(), recipe="standard", test_attack=attack)
        trainer = fit_steps(module, x, y, tmp_path)
        path = tmp_path / "m.ckpt"
        trainer.save_checkpoint(path)
        saved = torch.load(path, weights_only=True)["hyper_parameters"]["test_attack"]
        assert saved is None if attack is None else isinstance(saved, dict)
        loaded = AdversarialSelectionModule.load_from_checkpoint(path, model=TinyNet())
        assert type(loaded.test_attack) is type(attack) and loaded.test_attack == attack


def test_without_a_test_attack_testing_uses_the_validation_attack():
    eval_attack = AttackConfig(eps=0.2, steps=3)
    module = AdversarialSelectionModule(TinyNet(), eval_attack=eval_attack)
    assert module.robust_attack("test") is eval_attack and module.robust_attack("val") is eval_attack
    auto = AutoAttackConfig(eps=0.2)
    module = AdversarialSelectionModule(TinyNet(), eval_attack=eval_attack, test_attack=auto)
    assert module.robust_attack("test") is auto and module.robust_attack("val") is eval_attack


CLI_TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.limit_test_batches", "1", "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_progress_bar", "false", "--model.init_args.train_attack.steps", "1",
            "--model.init_args.eval_attack.steps", "1"]
AA_ARGS = ["--model.init_args.test_attack", "AutoAttackConfig", "--model.init_args.test_attack.eps", "0.1",
           "--model.init_args.test_attack.version", "apgd"]


@pytest.mark.slow
def test_cli_builds_autoattack_by_name_tests_with_it_and_its_checkpoint_reloads_it(tmp_path, capsys, small_budget):
    config = [*config_args(*MAIN_JOB), *CLI_TINY, *AA_ARGS]
    cli = build_cli(["fit", *config, "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert type(cli.model.test_attack) is AutoAttackConfig
    assert cli.model.test_attack == AutoAttackConfig(eps=0.1, version="apgd")
    # Validation still reports the PGD attack.
    assert "(PGD-1 linf eps=0.1" in capsys.readouterr().out
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    assert type(AdversarialSelectionModule.load_from_checkpoint(ckpt).test_attack) is AutoAttackConfig

    tested = build_cli(["test", *config, "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
                        "--ckpt_path", ckpt])
    robust = float(tested.trainer.callback_metrics["test/acc_robust"])
    described = f"AutoAttack apgd (reference: APGD-CE {ITERATIONS} it., APGD-T {ITERATIONS} it.) linf eps=0.1 seed=0"
    assert f"robust {robust:.4f} ({described})" in capsys.readouterr().out


@pytest.mark.parametrize(
    "yaml_text,args,expected",
    [
        # The YAML spelling of an AutoAttack test attack: class_path and init_args.
        ("test_attack:\n  class_path: lightning_advsel.AutoAttackConfig\n  init_args:\n    eps: 0.2\n"
         "    version: apgd\n", [], AutoAttackConfig(eps=0.2, version="apgd")),
        # A PGD test attack by its fields, in YAML or on the command line.
        ("test_attack:\n  eps: 0.2\n  steps: 50\n", [], AttackConfig(eps=0.2, steps=50)),
        ("", ["--model.init_args.test_attack", "AttackConfig", "--model.init_args.test_attack.eps", "0.2"],
         AttackConfig(eps=0.2)),
        ("", ["--model.init_args.test_attack", "AutoAttackConfig", "--model.init_args.test_attack.eps", "0.2"],
         AutoAttackConfig(eps=0.2)),
    ],
)
def test_cli_spellings_build_the_named_test_attack(tmp_path, yaml_text, args, expected):
    configs = config_args(*MAIN_JOB)
    if yaml_text:
        overlay = tmp_path / "overlay.yaml"
        overlay.write_text("model:\n  init_args:\n" + "".join(f"    {line}\n" for line in yaml_text.splitlines()))
        configs += ["--config", str(overlay)]
    cli = build_cli([*configs, *args, "--trainer.logger", "false"], run=False)
    assert type(cli.model.test_attack) is type(expected) and cli.model.test_attack == expected


@pytest.mark.slow
def test_under_ddp_each_rank_attacks_its_half_and_the_robust_count_is_reduced(tmp_path):
    run_ranks([sys.executable, str(REPO / "tests" / "ddp_eval_worker.py"), str(tmp_path)], tmp_path, 240,
              "2-rank DDP AutoAttack evaluation")
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    rows = [set(rank["rows"]) for rank in ranks]
    assert len(rows[0]) == len(rows[1]) == 16 and not rows[0] & rows[1]
    robust = sum(rank["robust"] for rank in ranks)
    assert 0 < robust < 32, "all or no rows robust: the reduction would not be tested"
    for rank in ranks:
        assert rank["acc_robust"] == pytest.approx(robust / 32, abs=1e-7)
