"""Classifiers taking inputs in [0, 1]; normalization is their first layer, so every epsilon is in pixels.

* :class:`SmallCNN`: a small convolutional network for 1-channel inputs (8x8 digits, 28x28 MNIST).
* :class:`ResNet18` and :class:`PreActResNet18`: the CIFAR variants (3x3 stem, no max-pool, 32x32 inputs)
  used throughout the adversarial-training literature (He et al., 2016a and 2016b).
* :class:`WideResNet`: Zagoruyko and Komodakis's wide residual network, WRN-34-10 and WRN-28-10 being the networks
  of Madry et al.'s PGD training, TRADES, MART and most of RobustBench's CIFAR-10 leaderboard.

The CIFAR networks' parameter names are those of the published code, so that published checkpoints load with
``load_state_dict``: ``ResNet18`` and ``PreActResNet18`` as in the CIFAR ResNet code the field shares, Wong et
al.'s fast adversarial training for the latter (``layer1``...``layer4``, ``linear``), ``WideResNet`` as in TRADES
and RobustBench (``block1``...``block3``, ``fc``). A state dict without the normalization statistics (published
weights carry none) keeps the ones the network was built with; ``mean=None, std=None`` builds a network without
normalization, for weights trained on raw pixels (TRADES's, Madry et al.'s).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

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

    A state dict without ``mean`` or ``std`` loads (also with ``strict=True``) and keeps the statistics given
    here: published checkpoints of networks that normalize outside themselves carry none.

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

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        absent = [prefix + name for name in ("mean", "std") if prefix + name not in state_dict]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        missing_keys[:] = [key for key in missing_keys if key not in absent]

    def _stats_for(self, x: Tensor) -> tuple[Tensor, Tensor]:
        channels = self.mean.numel()
        if x.dim() < 2 or (channels != 1 and x.shape[1] != channels):
            raise ValueError(f"Normalize has {channels} channel statistics; it needs inputs (B, {channels}, ...), "
                             f"got shape {tuple(x.shape)}")
        shape = (1, channels) + (1,) * (x.dim() - 2)  # broadcast along dimension 1, whatever the input's rank
        return self.mean.view(shape), self.std.view(shape)


def input_normalization(mean: Sequence[float] | None, std: Sequence[float] | None) -> nn.Module:
    """A network's first layer: :class:`Normalize` with ``mean`` and ``std``, or, with both ``None``, none.

    Raises:
        ValueError: if only one of ``mean`` and ``std`` is ``None``, or as :class:`Normalize`.
    """
    if mean is None and std is None:
        return nn.Identity()  # raw pixels: no parameters, no buffers, nothing in the state dict
    if mean is None or std is None:
        raise ValueError(f"`mean` and `std` must both be given, or both be None (no normalization), got mean={mean} "
                         f"and std={std}")
    return Normalize(mean, std)


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


def _conv3x3(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
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
    """Wong et al.'s pre-activation block: the projection shortcut reads the block's input before BatchNorm."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        skip = self.shortcut(x) if self.shortcut is not None else x
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class _CifarResNet(nn.Module):
    def __init__(self, block: type[nn.Module], preact: bool, num_classes: int, in_channels: int,
                 mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        super().__init__()
        check_int("num_classes", num_classes, 1)
        check_int("in_channels", in_channels, 1)
        self.normalize = input_normalization(mean, std)
        self.preact = preact
        self.conv1 = _conv3x3(in_channels, 64)
        if not preact:
            self.bn1 = nn.BatchNorm2d(64)  # ResNet: BatchNorm after the stem
        in_planes = 64
        for i, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
            setattr(self, f"layer{i}", nn.Sequential(block(in_planes, planes, stride), block(planes, planes, 1)))
            in_planes = planes
        if preact:
            self.bn = nn.BatchNorm2d(512)  # PreAct ResNet: BatchNorm after the last block
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.normalize(x))
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.preact:
            out = F.relu(self.bn(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class ResNet18(_CifarResNet):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), with the normalization layer first.

    Parameter names as in the ResNet-18 of the adversarial-training code bases (``conv1``, ``bn1``, ``layer1`` ...
    ``layer4`` with ``shortcut.0``/``shortcut.1`` projections, ``linear``).

    Args:
        num_classes: number of classes.
        in_channels: input channels.
        mean: per-channel mean (CIFAR-10's by default); ``None`` with ``std=None``: no normalization.
        std: per-channel standard deviation (CIFAR-10's by default).

    Raises:
        ValueError: for a non-positive ``num_classes`` or ``in_channels``, or statistics :class:`Normalize` refuses.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 mean: Sequence[float] | None = CIFAR10_MEAN, std: Sequence[float] | None = CIFAR10_STD) -> None:
        super().__init__(_BasicBlock, False, num_classes, in_channels, mean, std)


class PreActResNet18(_CifarResNet):
    """Pre-activation ResNet-18 for 32x32 inputs, the network of fast adversarial training (Wong et al., 2020) and
    of robust overfitting (Rice et al., 2020), defined as in their code: the projection shortcut of a block reads
    the block's input, not its BatchNorm-ReLU output, and the parameter names are theirs (``conv1``, ``layer1``
    ... ``layer4``, ``shortcut.0``, ``bn``, ``linear``), so their checkpoints load with ``load_state_dict``. They
    normalized with CIFAR-10's statistics outside the network: the defaults here.

    Args:
        num_classes: number of classes.
        in_channels: input channels.
        mean: per-channel mean (CIFAR-10's by default); ``None`` with ``std=None``: no normalization.
        std: per-channel standard deviation (CIFAR-10's by default).

    Raises:
        ValueError: for a non-positive ``num_classes`` or ``in_channels``, or statistics :class:`Normalize` refuses.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 mean: Sequence[float] | None = CIFAR10_MEAN, std: Sequence[float] | None = CIFAR10_STD) -> None:
        super().__init__(_PreActBlock, True, num_classes, in_channels, mean, std)


class _WideBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, plus the input; where the width or the stride changes, the
    shortcut is a 1x1 convolution of the activated input (Zagoruyko and Komodakis; TRADES's code)."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.dropout = dropout
        self.convShortcut: nn.Conv2d | None = None  # the published name, which checkpoints hold
        if in_planes != planes:
            self.convShortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(activated)))
        out = self.conv2(F.dropout(out, p=self.dropout, training=self.training) if self.dropout else out)
        return out + (x if self.convShortcut is None else self.convShortcut(activated))


class _WideGroup(nn.Module):
    """``n`` wide blocks at one width, the first with the group's stride (``layer`` is the published name)."""

    def __init__(self, n: int, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(*(_WideBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1,
                                                dropout) for i in range(n)))

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for 32x32 inputs (Zagoruyko and Komodakis, 2016), as TRADES and RobustBench
    define it: a 3x3 stem of 16 channels, three groups of ``(depth - 4) / 6`` pre-activation blocks of
    ``16k``, ``32k`` and ``64k`` channels (strides 1, 2, 2), BatchNorm-ReLU, global average pooling and ``fc``.
    Convolutions are initialized from N(0, 2 / fan-out) (kernel area x out channels), BatchNorm to (1, 0), the
    last bias to 0.

    ``WideResNet(34, 10)`` has 46.2 M parameters for 10 classes, ``WideResNet(28, 10)`` 36.5 M. The parameter
    names are TRADES's and RobustBench's (``conv1``, ``block1.layer.0.bn1`` ... ``convShortcut``, ``bn1``,
    ``fc``), so their checkpoints load with ``load_state_dict``: TRADES's WRN-34-10 with ``sub_block1=True``
    and, trained on raw pixels, ``mean=None, std=None``.

    Args:
        depth: layers; ``depth - 4`` must be a positive multiple of 6 (10, 16, 22, 28, 34, ...).
        widen_factor: ``k``, the width multiplier.
        num_classes: number of classes.
        in_channels: input channels.
        dropout: dropout probability between the two convolutions of a block (0: none, the adversarial-training
            setting).
        sub_block1: also hold an unused copy of the first group, ``sub_block1``, which TRADES's code builds and
            its checkpoints carry; it only makes those checkpoints load (the forward pass never reads it).
        mean: per-channel mean (CIFAR-10's by default); ``None`` with ``std=None``: no normalization.
        std: per-channel standard deviation (CIFAR-10's by default).

    Raises:
        ValueError: for a ``depth`` that is not 4 plus a positive multiple of 6, a non-positive ``widen_factor``,
            ``num_classes`` or ``in_channels``, a ``dropout`` outside [0, 1), or statistics :class:`Normalize`
            refuses.
    """

    def __init__(self, depth: int = 34, widen_factor: int = 10, num_classes: int = 10, in_channels: int = 3,
                 dropout: float = 0.0, sub_block1: bool = False,
                 mean: Sequence[float] | None = CIFAR10_MEAN, std: Sequence[float] | None = CIFAR10_STD) -> None:
        super().__init__()
        check_int("depth", depth, 10)
        if (depth - 4) % 6:
            raise ValueError(f"`depth` must be 4 plus a positive multiple of 6 (10, 16, 22, 28, 34, ...), got {depth}")
        check_int("widen_factor", widen_factor, 1)
        check_int("num_classes", num_classes, 1)
        check_int("in_channels", in_channels, 1)
        check_bool("sub_block1", sub_block1)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"`dropout` must be a probability in [0, 1), got {dropout!r}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.normalize = input_normalization(mean, std)
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.block1 = _WideGroup(n, widths[0], widths[1], 1, dropout)
        if sub_block1:
            self.sub_block1 = _WideGroup(n, widths[0], widths[1], 1, dropout)
        self.block2 = _WideGroup(n, widths[1], widths[2], 2, dropout)
        self.block3 = _WideGroup(n, widths[2], widths[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(self.normalize(x)))))
        out = F.relu(self.bn1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))
