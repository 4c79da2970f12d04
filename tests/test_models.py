"""The models: the normalization layer they carry (channel statistics broadcast along dimension 1 of any input)
and the small CNN's options."""

from __future__ import annotations

import pytest
import torch

from lightning_advsel import Normalize


def test_images_are_normalized_per_channel():
    layer = Normalize((0.5, 0.25), (0.5, 0.25))
    x = torch.rand(4, 2, 3, 3)
    out = layer(x)
    assert torch.allclose(out[:, 0], (x[:, 0] - 0.5) / 0.5) and torch.allclose(out[:, 1], (x[:, 1] - 0.25) / 0.25)


def test_feature_vectors_are_normalized_per_feature_and_keep_their_shape():
    layer = Normalize((0.1, 0.2, 0.3), (1.0, 2.0, 4.0))
    x = torch.rand(5, 3)
    out = layer(x)
    assert out.shape == (5, 3)
    assert torch.allclose(out, (x - torch.tensor([0.1, 0.2, 0.3])) / torch.tensor([1.0, 2.0, 4.0]))


def test_one_statistic_serves_every_channel_or_feature():
    layer = Normalize((0.5,), (0.5,))
    assert layer(torch.ones(2, 7)).shape == (2, 7) and torch.equal(layer(torch.ones(2, 7)), torch.ones(2, 7))
    assert layer(torch.zeros(2, 3, 4, 4)).shape == (2, 3, 4, 4)


def test_an_input_with_another_channel_count_is_refused_naming_the_shapes():
    with pytest.raises(ValueError, match=r"3 channel statistics; it needs inputs \(B, 3, \.\.\.\), got shape \(5, 4\)"):
        Normalize((0.1, 0.2, 0.3), (1.0, 1.0, 1.0))(torch.rand(5, 4))


@pytest.mark.parametrize("mean,std,match", [
    ((), (), r"one entry per channel, got 0 means \[\] and 0 stds \[\]"),
    ((0.5, 0.5), (0.2,), r"one entry per channel, got 2 means \[0.5, 0.5\] and 1 stds \[0.2\]"),
    ((float("nan"),), (0.2,), r"`mean` must be finite numbers, got \[nan\]"),
    ((0.5,), (float("inf"),), r"`std` must be finite numbers, got \[inf\]"),
    ((0.5,), (True,), r"`std` must be finite numbers, got \[True\]"),
    ((0.5, 0.5), (0.2, -0.1), r"`std` entries must be > 0, got \[0.2, -0.1\]"),
])
def test_statistics_that_cannot_normalize_are_refused_naming_the_values(mean, std, match):
    with pytest.raises(ValueError, match=match):
        Normalize(mean, std)


def test_statistics_from_arrays_and_tensors_are_taken_as_numbers():
    import numpy as np

    x = torch.rand(2, 3, 4, 4)
    reference = Normalize((0.1, 0.2, 0.3), (0.5, 0.25, 2.0))(x)
    for mean, std in ((np.array([0.1, 0.2, 0.3], dtype=np.float32), np.array([0.5, 0.25, 2.0], dtype=np.float32)),
                      (torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.25, 2.0]))):
        assert torch.allclose(Normalize(mean, std)(x), reference)
    with pytest.raises(ValueError, match=r"`std` must be finite numbers"):
        Normalize(torch.tensor([0.1]), torch.tensor([float("nan")]))


def test_small_cnn_takes_a_batchnorm_after_each_convolution_only_when_asked():
    from lightning_advsel.models import SmallCNN

    x = torch.rand(4, 3, 32, 32)
    plain = SmallCNN(in_channels=3, input_size=32, width=8, hidden=16)
    normed = SmallCNN(in_channels=3, input_size=32, width=8, hidden=16, batch_norm=True)
    convs = [m for m in plain.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(c.bias is not None for c in convs)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    norms = [m for m in normed.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [n.num_features for n in norms] == [8, 8, 16, 16]
    assert all(c.bias is None for c in normed.modules() if isinstance(c, torch.nn.Conv2d))  # BatchNorm's shift
    assert plain(x).shape == normed(x).shape == (4, 10)
    # Without the option the parameter names are the ones checkpoints of this network hold.
    assert "features.2.weight" in plain.state_dict() and "features.3.weight" in normed.state_dict()
    with pytest.raises(ValueError, match="batch_norm"):
        SmallCNN(batch_norm="yes")


# ---------------------------------------------------------------------------------------- the published networks
# Each check writes down the published parameter names and shapes (TRADES's and RobustBench's WideResNet, Wong et
# al.'s PreActResNet18), loads random weights under those names strictly, and compares the network's output with a
# forward pass written from the papers' definitions over that state dict alone.


def bn_entries(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{name}": (channels,) for name in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()}


def wrn_names(depth: int, k: int, num_classes: int, sub_block1: bool) -> dict[str, tuple[int, ...]]:
    """TRADES's WideResNet state dict: name -> shape."""
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    names = {"conv1.weight": (16, 3, 3, 3)}
    groups = [("block1", 0), *([("sub_block1", 0)] if sub_block1 else []), ("block2", 1), ("block3", 2)]
    for group, g in groups:
        for j in range(n):
            cin, cout = (widths[g] if j == 0 else widths[g + 1]), widths[g + 1]
            p = f"{group}.layer.{j}"
            names |= bn_entries(f"{p}.bn1", cin) | {f"{p}.conv1.weight": (cout, cin, 3, 3)}
            names |= bn_entries(f"{p}.bn2", cout) | {f"{p}.conv2.weight": (cout, cout, 3, 3)}
            if cin != cout:
                names[f"{p}.convShortcut.weight"] = (cout, cin, 1, 1)
    return names | bn_entries("bn1", widths[3]) | {"fc.weight": (num_classes, widths[3]), "fc.bias": (num_classes,)}


def wong_preact_names(num_classes: int = 10) -> dict[str, tuple[int, ...]]:
    """Wong et al.'s PreActResNet18 state dict: name -> shape."""
    names, cin = {"conv1.weight": (64, 3, 3, 3)}, 64
    for i, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
        for j in range(2):
            p, c = f"layer{i}.{j}", (cin if j == 0 else planes)
            names |= bn_entries(f"{p}.bn1", c) | {f"{p}.conv1.weight": (planes, c, 3, 3)}
            names |= bn_entries(f"{p}.bn2", planes) | {f"{p}.conv2.weight": (planes, planes, 3, 3)}
            if j == 0 and (stride != 1 or cin != planes):
                names[f"{p}.shortcut.0.weight"] = (planes, cin, 1, 1)
        cin = planes
    return names | bn_entries("bn", 512) | {"linear.weight": (num_classes, 512), "linear.bias": (num_classes,)}


def random_state(names: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in names.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(7)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=g) + 0.5
        else:  # weights scaled so that activations stay of order one through the blocks
            fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 4
            state[name] = torch.randn(shape, generator=g) / fan_in**0.5
    return state


def bn_relu(s: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    return torch.relu(torch.nn.functional.batch_norm(
        x, s[f"{prefix}.running_mean"], s[f"{prefix}.running_var"], s[f"{prefix}.weight"], s[f"{prefix}.bias"]))


def conv(s: dict, name: str, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    w = s[name]
    return torch.nn.functional.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2)


def wrn_reference(s: dict, depth: int, x: torch.Tensor) -> torch.Tensor:
    """TRADES's forward: a block activates its input once; the shortcut is that activation's 1x1 convolution where
    the width changes, the raw input otherwise."""
    out = conv(s, "conv1.weight", x)
    for group, stride in (("block1", 1), ("block2", 2), ("block3", 2)):
        for j in range((depth - 4) // 6):
            p = f"{group}.layer.{j}"
            a = bn_relu(s, f"{p}.bn1", out)
            h = bn_relu(s, f"{p}.bn2", conv(s, f"{p}.conv1.weight", a, stride if j == 0 else 1))
            h = conv(s, f"{p}.conv2.weight", h)
            skip = out if f"{p}.convShortcut.weight" not in s else conv(s, f"{p}.convShortcut.weight", a,
                                                                         stride if j == 0 else 1)
            out = h + skip
    out = bn_relu(s, "bn1", out).mean(dim=(2, 3))
    return out @ s["fc.weight"].T + s["fc.bias"]


def wong_preact_reference(s: dict, x: torch.Tensor) -> torch.Tensor:
    """Wong et al.'s forward: the projection shortcut reads a block's raw input; BatchNorm-ReLU after the last."""
    out = conv(s, "conv1.weight", x)
    for i, stride in enumerate((1, 2, 2, 2), start=1):
        for j in range(2):
            p = f"layer{i}.{j}"
            st = stride if j == 0 else 1
            skip = conv(s, f"{p}.shortcut.0.weight", out, st) if f"{p}.shortcut.0.weight" in s else out
            h = conv(s, f"{p}.conv1.weight", bn_relu(s, f"{p}.bn1", out), st)
            out = conv(s, f"{p}.conv2.weight", bn_relu(s, f"{p}.bn2", h)) + skip
    out = torch.nn.functional.avg_pool2d(bn_relu(s, "bn", out), 4).flatten(1)
    return out @ s["linear.weight"].T + s["linear.bias"]


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


@pytest.mark.parametrize("depth,count", [(34, 46_160_474), (28, 36_479_194)])
def test_wide_resnets_have_the_usual_parameter_counts_and_class_outputs(depth, count):
    from lightning_advsel.models import WideResNet

    net = WideResNet(depth, 10)
    assert sum(p.numel() for p in net.parameters()) == count  # 46.2 M and 36.5 M
    wide100 = WideResNet(depth, 10, num_classes=100)
    assert sum(p.numel() for p in wide100.parameters()) == count + 90 * 640 + 90
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert net.eval()(x).shape == (2, 10) and wide100.eval()(x).shape == (2, 100)


def test_trades_wrn_34_10_checkpoint_keys_load_strictly():
    from lightning_advsel.models import WideResNet

    published = wrn_names(34, 10, 10, sub_block1=True)
    raw = WideResNet(34, 10, sub_block1=True, mean=None, std=None)
    assert shapes(raw) == published  # the same names and shapes, nothing more
    raw.load_state_dict({name: torch.zeros(shape) for name, shape in published.items()})
    # RobustBench's WideResNet-28-10 (no sub-block) into the default network, which keeps its normalization.
    normalized = WideResNet(28, 10)
    assert shapes(normalized).keys() - wrn_names(28, 10, 10, False).keys() == {"normalize.mean", "normalize.std"}
    normalized.load_state_dict({name: torch.zeros(shape) for name, shape in wrn_names(28, 10, 10, False).items()})
    assert torch.allclose(normalized.normalize.mean.flatten(), torch.tensor([0.4914, 0.4822, 0.4465]))


@pytest.mark.parametrize("depth,k", [(10, 2), (16, 1)])
def test_wide_resnet_computes_the_published_forward_pass(depth, k):
    from lightning_advsel.models import WideResNet

    state = random_state(wrn_names(depth, k, 10, sub_block1=False))
    net = WideResNet(depth, k, mean=None, std=None)
    net.load_state_dict(state)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), wrn_reference(state, depth, x), atol=1e-4)


def test_preact_resnet18_is_wong_et_al_s_names_and_forward_pass():
    from lightning_advsel.models import CIFAR10_MEAN, CIFAR10_STD, PreActResNet18

    published = wong_preact_names()
    net = PreActResNet18()
    assert shapes(net).keys() - published.keys() == {"normalize.mean", "normalize.std"}
    assert {k: v for k, v in shapes(net).items() if k in published} == published
    state = random_state(published)
    net.load_state_dict(state)  # strict: published weights carry no statistics, the network keeps CIFAR-10's
    x = torch.rand(3, 3, 32, 32)
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        # Wong et al. normalized outside the network, with CIFAR-10's statistics.
        assert torch.allclose(net.eval()(x), wong_preact_reference(state, (x - mean) / std), atol=1e-4)
    assert shapes(PreActResNet18(mean=None, std=None)) == published


def test_resnet18_keeps_the_adversarial_training_code_bases_names():
    from lightning_advsel.models import ResNet18

    names = set(ResNet18(mean=None, std=None).state_dict())
    assert {"conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer2.0.shortcut.0.weight",
            "layer2.0.shortcut.1.running_var", "layer4.1.bn2.bias", "linear.weight"} <= names
    assert all(name.split(".")[0] in {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "linear"}
               for name in names)


def test_statistics_in_a_state_dict_are_loaded_and_absent_ones_kept():
    from lightning_advsel.models import PreActResNet18

    ours = PreActResNet18(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    fresh = PreActResNet18()
    fresh.load_state_dict(ours.state_dict())  # our own checkpoints carry the statistics they were trained with
    assert torch.equal(fresh.normalize.std, ours.normalize.std)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*linear.bias"):
        PreActResNet18().load_state_dict({k: v for k, v in ours.state_dict().items() if k != "linear.bias"})


@pytest.mark.parametrize("kwargs,match", [
    ({"depth": 30}, r"`depth` must be 4 plus a positive multiple of 6 .* got 30"),
    ({"depth": 4}, r"`depth` must be an integer >= 10, got 4"),
    ({"widen_factor": 0}, r"`widen_factor` must be an integer >= 1, got 0"),
    ({"dropout": 1.0}, r"`dropout` must be a probability in \[0, 1\), got 1.0"),
    ({"sub_block1": "yes"}, r"`sub_block1` must be true or false, got 'yes'"),
    ({"mean": None}, r"`mean` and `std` must both be given, or both be None .* got mean=None and std=\(0.2471"),
])
def test_wide_resnet_arguments_are_checked_naming_the_value(kwargs, match):
    from lightning_advsel.models import WideResNet

    with pytest.raises(ValueError, match=match):
        WideResNet(**{"depth": 10, "widen_factor": 1, **kwargs})


def test_without_statistics_a_network_reads_raw_pixels():
    from lightning_advsel.models import WideResNet

    net = WideResNet(10, 1, mean=None, std=None).eval()
    assert not any(name.startswith("normalize") for name in net.state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), net.fc(torch.relu(net.bn1(net.block3(net.block2(net.block1(net.conv1(x))))))
                                          .mean(dim=(2, 3))))
