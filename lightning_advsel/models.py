"""Classifiers taking inputs in [0, 1]; normalization is their first layer, so every epsilon is in pixels.

* :class:`SmallCNN`: a small convolutional network for 1-channel inputs (8x8 digits, 28x28 MNIST).
* :class:`ResNet18` and :class:`PreActResNet18`: the CIFAR variants (3x3 stem, no max-pool, 32x32 inputs)
  used throughout the adversarial-training literature (He et al., 2016a and 2016b).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_advsel.checks import check_bool, check_int

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


def _finite_floats(name: str, values: Sequence[float]) -> list[float]:
    """``values`` (a list, tuple, array or 1-D tensor of numbers) as floats; bools and strings are refused."""
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError):
        floats = None
    if floats is None or any(isinstance(v, (bool, str, bytes)) for v in values) or not all(map(math.isfinite, floats)):
        raise ValueError(f"`{name}` must be finite numbers, got {list(values)}")
    return floats


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with the statistics stored as (non-trainable) buffers.

    The channel is dimension 1 of any input of at least two dimensions: images ``(B, C, H, W)``, sequences
    ``(B, C, L)`` or feature vectors ``(B, D)`` (one statistic per feature, or one for all).

    Raises:
        ValueError: unless ``mean`` and ``std`` are equally long, non-empty sequences of finite numbers with every
            ``std`` entry positive; in ``forward``, for an input whose dimension 1 is neither 1 nor the number of
            statistics.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean, std = _finite_floats("mean", mean), _finite_floats("std", std)
        if not mean or len(mean) != len(std):
            raise ValueError(f"`mean` and `std` must have one entry per channel, got {len(mean)} means {mean} "
                             f"and {len(std)} stds {std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"`std` entries must be > 0, got {std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        mean, std = self._stats_for(x)
        return (x - mean) / std

    def inverse(self, x: Tensor) -> Tensor:
        """``x * std + mean``: normalized inputs back to pixels (the inverse of ``forward``)."""
        mean, std = self._stats_for(x)
        return x * std + mean

    def _stats_for(self, x: Tensor) -> tuple[Tensor, Tensor]:
        channels = self.mean.numel()
        if x.dim() < 2 or (channels != 1 and x.shape[1] != channels):
            raise ValueError(f"Normalize has {channels} channel statistics; it needs inputs (B, {channels}, ...), "
                             f"got shape {tuple(x.shape)}")
        shape = (1, channels) + (1,) * (x.dim() - 2)  # broadcast along dimension 1, whatever the input's rank
        return self.mean.view(shape), self.std.view(shape)


class SmallCNN(nn.Module):
    """Two conv blocks (two 3x3 convolutions and a 2x2 max-pool each) and a two-layer head.

    Args:
        in_channels: input channels (1 for digits and MNIST).
        num_classes: number of classes.
        input_size: height and width of the (square) input in pixels; a multiple of 4.
        width: channels of the first block (the second has twice as many).
        hidden: width of the hidden fully connected layer.
        mean: per-channel mean used by the normalization layer.
        std: per-channel standard deviation used by the normalization layer.
        batch_norm: a BatchNorm after each convolution (whose bias it replaces); without it (the default) the
            layers and their parameter names are the network's as before this option existed.

    Raises:
        ValueError: for a non-positive size or an ``input_size`` that is not a multiple of 4.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 8,
        width: int = 32,
        hidden: int = 128,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("input_size", input_size),
                            ("width", width), ("hidden", hidden)):
            check_int(name, value, 1)
        check_bool("batch_norm", batch_norm)
        if input_size % 4:
            raise ValueError(f"`input_size` must be a multiple of 4 (two 2x2 pools), got {input_size}")
        self.normalize = Normalize(mean, std)

        def conv(cin: int, cout: int) -> list[nn.Module]:
            if batch_norm:
                return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]

        self.features = nn.Sequential(
            *conv(in_channels, width), *conv(width, width), nn.MaxPool2d(2),
            *conv(width, 2 * width), *conv(2 * width, 2 * width), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        side = input_size // 4
        self.head = nn.Sequential(nn.Linear(2 * width * side * side, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(self.normalize(x)))


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class _CifarResNet(nn.Module):
    def __init__(self, block: type[nn.Module], preact: bool, num_classes: int, in_channels: int,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        check_int("num_classes", num_classes, 1)
        check_int("in_channels", in_channels, 1)
        self.normalize = Normalize(mean, std)
        self.preact = preact
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        # ResNet: BatchNorm after the stem; PreAct ResNet: BatchNorm after the last block.
        self.bn1 = nn.BatchNorm2d(512 if preact else 64)
        layers, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(block(in_planes, planes, stride), block(planes, planes, 1)))
            in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.normalize(x))
        if self.preact:
            out = F.relu(self.bn1(self.layers(out)))
        else:
            out = self.layers(F.relu(self.bn1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class ResNet18(_CifarResNet):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), with the normalization layer first.

    Args:
        num_classes: number of classes.
        in_channels: input channels.
        mean: per-channel mean (CIFAR-10's by default).
        std: per-channel standard deviation (CIFAR-10's by default).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD) -> None:
        super().__init__(_BasicBlock, False, num_classes, in_channels, mean, std)


class PreActResNet18(_CifarResNet):
    """Pre-activation ResNet-18 for 32x32 inputs, the usual network of fast adversarial training.

    Args:
        num_classes: number of classes.
        in_channels: input channels.
        mean: per-channel mean (CIFAR-10's by default).
        std: per-channel standard deviation (CIFAR-10's by default).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD) -> None:
        super().__init__(_PreActBlock, True, num_classes, in_channels, mean, std)
