"""The compiled attack (lightning_advsel.compiled_attack) against the eager one, on CPU.

Compiled with ``aot_eager`` (the graph dynamo captures, run by torch's own kernels), counted by
``torch._dynamo.testing.CompileCounterWithBackend``: what is checked is the capture (one graph, no break, no
recompilation), the draws and the numbers, without paying for code generation. Most tests use the one-step graph,
which compiles in a fraction of the loop's time; one compares the two.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyNet, tiny_batch
from test_host_work import OwnForwardNorm
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils.flop_counter import FlopCounterMode

from lightning_advsel import compiled_attack
from lightning_advsel.attacks import AttackConfig
from lightning_advsel.compiled_attack import CompiledPGD, check_torch, eager_reason
from lightning_advsel.models import Normalize, SmallCNN
from lightning_advsel.objectives import Objective
from lightning_advsel.schedules import warmup_factor
from lightning_advsel.static_shapes import attack_sizes, step_shapes
from lightning_advsel.step import StepSettings, adversarial_step, eager_attack

ATTACK = AttackConfig(eps=0.1, alpha=0.025, steps=3, mode="train")
# The adversarial losses of the compiled and the eager attack agree to this relative tolerance: the same operators
# (aot_eager), or with inductor a different order of floating-point sums.
LOSS_RTOL = 1e-4


def bn_net() -> SmallCNN:
    """A small CNN with BatchNorm after every convolution, on 1x8x8 inputs."""
    torch.manual_seed(0)
    return SmallCNN(width=4, hidden=16, mean=(0.3,), std=(0.4,), batch_norm=True).train()


def bn_mlp() -> TinyNet:
    """TinyNet with a BatchNorm: where a test compiles several graphs, an MLP keeps each cheap."""
    torch.manual_seed(0)
    return TinyNet(batchnorm=True).train()


def counted(**options) -> tuple[CompiledPGD, CompileCounterWithBackend]:
    counter = CompileCounterWithBackend("aot_eager")
    return CompiledPGD(backend=counter, graph=options.pop("graph", "step"), **options), counter


def adversarial_loss(net: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return F.cross_entropy(net(x_adv).float(), y).item()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("attack,objective", [
    (ATTACK, "ce"),
    (replace(ATTACK, loss="margin"), "ce"),
    (ATTACK, "trades"),
    (AttackConfig(eps=0.5, alpha=0.2, steps=2, norm="l2", restarts=2, mode="eval"), "ce"),
], ids=["linf-ce-train", "margin", "trades-kl", "l2-restarts-eval"])
def test_the_compiled_attack_reaches_the_eager_attacks_loss_from_the_same_draws(attack, objective):
    net, (x, y) = (bn_net() if objective == "ce" and attack.norm == "linf" and attack.loss == "ce" else bn_mlp(),
                   tiny_batch(16))  # convolutions and BatchNorm once; the other settings on the cheaper MLP
    compiled, counter = counted()
    gen_c, gen_e = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    x_c = compiled(net, x, y, attack, gen_c, Objective(objective))
    x_e = eager_attack(net, x, y, attack, gen_e, Objective(objective))
    assert adversarial_loss(net, x_c, y) == pytest.approx(adversarial_loss(net, x_e, y), rel=LOSS_RTOL)
    assert adversarial_loss(net, x_c, y) > adversarial_loss(net, x, y)  # it did attack
    # The same draws: a resumed run, which reseeds the step's generator, continues where the eager one would.
    assert torch.equal(gen_c.get_state(), gen_e.get_state())
    assert (x_c - x).abs().amax() <= attack.eps + 1e-6 or attack.norm == "l2"
    assert 0 <= float(x_c.min()) and float(x_c.max()) <= 1
    assert counter.frame_count == 1 and compiled.eager_calls == 0 and not x_c.requires_grad


def test_the_whole_loop_and_the_replayed_step_are_the_same_attack():
    net, (x, y) = bn_mlp(), tiny_batch(16)
    out = {}
    for graph in ("loop", "step"):
        compiled, counter = counted(graph=graph)
        out[graph] = compiled(net, x, y, ATTACK, torch.Generator().manual_seed(1))
        assert counter.frame_count == 1 and counter.op_count > 0
    assert adversarial_loss(net, out["loop"], y) == pytest.approx(adversarial_loss(net, out["step"], y), rel=LOSS_RTOL)


def test_a_wrapper_built_on_each_call_reuses_the_first_graph():
    """The module's pixel_model is nn.Sequential(normalize, model), a new object on each access: still one graph."""
    net, (x, y) = bn_net(), tiny_batch(8)
    normalize = Normalize((0.1,), (0.5,))
    compiled, counter = counted()
    for seed in range(3):
        compiled(nn.Sequential(normalize, net), x, y, ATTACK, torch.Generator().manual_seed(seed))
    assert counter.frame_count == compiled.compilations == 1


def test_the_attack_leaves_gradients_and_running_statistics_to_the_training_backward():
    net, (x, y) = bn_net(), tiny_batch(16)
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    compiled, _ = counted()
    x_adv = compiled(net, x, y, ATTACK, torch.Generator().manual_seed(1))
    assert all(p.grad is None for p in net.parameters())  # no parameter gradient: no DDP hook would fire
    assert all(torch.equal(v, buffers[k]) for k, v in net.named_buffers())
    F.cross_entropy(net(x_adv), y).backward()  # the training backward, on the real parameters
    assert all(p.grad is not None for p in net.parameters())
    assert not torch.equal(net.features[1].running_mean, buffers["features.1.running_mean"])


def test_bf16_autocast_compiled_attack_reaches_the_eager_loss():
    net, (x, y) = bn_net(), tiny_batch(16)
    compiled, counter = counted()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_c = compiled(net, x, y, ATTACK, torch.Generator().manual_seed(1))
        x_e = eager_attack(net, x, y, ATTACK, torch.Generator().manual_seed(1), Objective())
        assert net(x_c).dtype == torch.bfloat16
    assert adversarial_loss(net, x_c, y) == pytest.approx(adversarial_loss(net, x_e, y), rel=1e-2)  # bf16's mantissa
    assert counter.frame_count == 1


def test_an_evaluation_attack_runs_under_inference_mode_as_lightnings_validation_does():
    net, (x, y) = bn_net(), tiny_batch(8)
    compiled, _ = counted()
    attack = replace(ATTACK, mode="eval")
    with torch.inference_mode():
        x_c = compiled(net, x, y, attack, torch.Generator().manual_seed(2))
    x_e = eager_attack(net, x, y, attack, torch.Generator().manual_seed(2), Objective())
    assert adversarial_loss(net.eval(), x_c, y) == pytest.approx(adversarial_loss(net, x_e, y), rel=LOSS_RTOL)


# ------------------------------------------------------------------------------------- recipes and shapes
RECIPE_CASES = [("robust", "ce", 1.0), ("ds", "ce", 0.5), ("random", "ce", 0.5), ("selective", "ce", 1.0),
                ("selective_ds", "ce", 0.5), ("robust", "trades", 0.5), ("ds", "mart", 0.5),
                ("selective", "trades", 1.0)]


def test_every_recipe_and_objective_trains_on_the_eager_loss_with_its_static_sizes():
    """One compiled attack for all: robust, ds and random share the B-row graph, the selective recipes the k-row
    one, TRADES adds its KL graph of each size."""
    net, (x, y) = bn_mlp(), tiny_batch(16)
    compiled, counter = counted()
    for recipe, objective, p_up in RECIPE_CASES:
        settings = StepSettings(recipe=recipe, p_up=p_up, attack_frac=0.5, train_attack=ATTACK,
                                objective=Objective(objective))
        eager = adversarial_step(net, x, y, settings, torch.Generator().manual_seed(5))
        ours = adversarial_step(net, x, y, settings, torch.Generator().manual_seed(5), attacker=compiled)
        assert ours.loss.item() == pytest.approx(eager.loss.item(), rel=LOSS_RTOL), (recipe, objective)
        shapes = step_shapes(settings, 16)
        for out in (ours, eager):
            assert out.record.attacked.numel() == shapes.attacked and out.record.y.numel() == shapes.pool
            assert out.record.selected.numel() == shapes.selected, (recipe, objective)
        assert torch.equal(ours.record.selected, eager.record.selected) and ours.cost == eager.cost
    assert counter.frame_count == compiled.compilations == 4 and compiled.eager_calls == 0  # {16, 8} rows x {ce, kl}


def test_an_epoch_with_radius_warm_up_attack_warm_up_adaptive_p_up_and_a_short_last_batch_compiles_each_size_once():
    """Two epochs of 40 rows in batches of 16 (the last of 8): the radius grows every batch, the first epoch attacks
    every row (attack_warmup_epochs), p_up changes between epochs as AdaptivePUp would: the attack compiles one graph
    per size that attack_sizes lists, and no more."""
    net = bn_mlp()
    x, y = tiny_batch(40)
    compiled, counter = counted()
    settings = StepSettings(recipe="selective", p_up=1.0, attack_frac=0.5, train_attack=ATTACK)
    for epoch, p_up in ((0, 1.0), (1, 0.75)):
        for i, start in enumerate(range(0, 40, 16)):
            step = replace(settings, p_up=p_up, attack_frac=1.0 if epoch < 1 else settings.attack_frac,
                           train_attack=ATTACK.scaled(warmup_factor(epoch + (i + 1) / 3, 2)))
            adversarial_step(net, x[start:start + 16], y[start:start + 16], step, attacker=compiled)
    expected = attack_sizes(settings, [16, 8], attack_warmup_epochs=1)
    assert expected == [16, 8, 4]
    assert counter.frame_count == compiled.compilations == len(expected) and compiled.eager_calls == 0


def test_past_its_bound_a_batch_runs_eagerly_and_says_so_once_and_torchs_own_limit_never_decides(monkeypatch):
    said = []
    monkeypatch.setattr(compiled_attack, "rank_zero_info", said.append)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)  # torch would fall back after one graph
    net, (x, y) = bn_mlp(), tiny_batch(16)
    compiled, counter = counted(max_graphs=2)
    for rows in (16, 8, 4, 4):
        out = compiled(net, x[:rows], y[:rows], ATTACK, torch.Generator().manual_seed(rows))
        eager = eager_attack(net, x[:rows], y[:rows], ATTACK, torch.Generator().manual_seed(rows), Objective())
        assert adversarial_loss(net, out, y[:rows]) == pytest.approx(adversarial_loss(net, eager, y[:rows]),
                                                                     rel=LOSS_RTOL)
    assert counter.frame_count == compiled.compilations == 2 and compiled.eager_calls == 2
    assert len(said) == 1 and "`max_graphs`=2" in said[0] and "(4, 1, 8, 8)" in said[0]


class SyncNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.SyncBatchNorm(8), nn.Linear(8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def own_forward_norm_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), OwnForwardNorm(4), nn.Flatten(), nn.Linear(144, 10))


@pytest.mark.parametrize("make,mode,reason", [
    (own_forward_norm_net, "train", "has a forward of its own"),
    (lambda: TinyNet(batchnorm=True), "keep", "mode 'keep' leaves the training BatchNorm"),
    (SyncNet, "eval", "SyncBatchNorm"),
], ids=["own-batchnorm-forward", "keep-mode", "syncbatchnorm"])
def test_an_attack_torch_func_cannot_take_runs_eagerly_and_says_why(monkeypatch, make, mode, reason):
    said = []
    monkeypatch.setattr(compiled_attack, "rank_zero_info", said.append)
    net, (x, y) = make().train(), tiny_batch(8)
    assert reason in eager_reason(net, mode)
    compiled, counter = counted()
    out = compiled(net, x, y, replace(ATTACK, mode=mode), torch.Generator().manual_seed(0))
    assert out.shape == x.shape and counter.frame_count == 0 and compiled.eager_calls == 1
    assert len(said) == 1 and reason in said[0]
    assert eager_reason(TinyNet(batchnorm=True).train(), "train") is None  # torch's own BatchNorm compiles


def test_under_a_dispatch_mode_the_attack_runs_eagerly_and_says_so(monkeypatch):
    """Dynamo compiles nothing under a TorchDispatchMode (fullgraph would raise): a FLOP count of a training step
    (benchmarks/flop_count.py) gets the eager attack's FLOPs instead of an error."""
    said = []
    monkeypatch.setattr(compiled_attack, "rank_zero_info", said.append)
    net, (x, y) = bn_mlp(), tiny_batch(8)
    compiled, counter = counted()
    with FlopCounterMode(display=False) as flops:
        compiled(net, x, y, ATTACK, torch.Generator().manual_seed(0))
    assert flops.get_total_flops() > 0 and counter.frame_count == 0 and compiled.eager_calls == 1
    assert len(said) == 1 and "FlopCounterMode" in said[0]


def test_the_oldest_torch_is_refused_and_an_untested_one_is_named(monkeypatch):
    said = []
    monkeypatch.setattr(compiled_attack, "rank_zero_info", said.append)
    with pytest.raises(RuntimeError, match=r"`compile_attack` needs torch >= 2\.11 .*found 2\.10\.1"):
        check_torch("2.10.1")
    check_torch("2.11.0+cu130")
    assert len(said) == 1 and "torch 2.11.0+cu130 is older than 2.14" in said[0]
    check_torch("2.14.1")
    assert len(said) == 1


def test_compiled_pgd_checks_its_arguments():
    with pytest.raises(ValueError, match="`graph` must be one of"):
        CompiledPGD(graph="steps")
    with pytest.raises(ValueError, match=r"`max_graphs` must be an integer >= 1, got 0"):
        CompiledPGD(max_graphs=0)
    with pytest.raises(ValueError, match="`mode` is an option of the 'inductor' backend"):
        CompiledPGD(backend="aot_eager", mode="reduce-overhead")
