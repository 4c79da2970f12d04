"""Batch augmentation on tensors: CIFAR's random crop with zero padding and horizontal flip.

The augmentation is a pure function of ``(images, generator)``: it runs on whole batches wherever they are
(on the accelerator after the batch is transferred) and draws every random number from the generator it is
given, never from the global random state. :func:`augment_generator` seeds that generator from
``(seed, epoch, batch index, rank)``, so the augmentation of a training sample is a function of where it sits in
the training order, and a run resumed mid-epoch augments the remaining batches exactly as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_advsel.checks import check_int


def random_crop_flip(x: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Randomly crop each image out of its zero-padded copy and flip half of them left-right.

    Each image is padded by ``padding`` zeros on every side and an ``H x W`` window at a uniform offset in
    ``[0, 2 * padding]`` per axis is cut out of it; independently, each image is mirrored with probability
    1/2. This is torchvision's ``RandomCrop(size, padding)`` followed by ``RandomHorizontalFlip()``, for a whole
    batch at once: one pad and one gather with per-sample offsets.

    Args:
        x: images ``(B, C, H, W)``, any dtype (uint8 or float), on any device.
        generator: source of the offsets and flips; its device may differ from ``x``'s (the few draws are
            moved), so a CPU generator gives the same augmentation on every device.
        padding: pixels of zero padding per side (4 for CIFAR).

    Returns:
        A new tensor with the shape, dtype and device of ``x``.

    Raises:
        ValueError: if ``x`` is not 4-dimensional or ``padding`` is not a non-negative integer.
    """
    if x.ndim != 4:
        raise ValueError(f"`x` must be a batch of images (B, C, H, W), got shape {tuple(x.shape)}")
    check_int("padding", padding, 0)
    b, c, h, w = x.shape
    # The draws in one (B, 3) tensor: the row and column offsets, then the flip. One copy to x's device.
    draws = torch.cat([torch.randint(0, 2 * padding + 1, (b, 2), generator=generator, device=generator.device),
                       (torch.rand(b, generator=generator, device=generator.device) < 0.5).long()[:, None]], dim=1)
    draws = _copy_to(draws, x.device)
    offsets, flip = draws[:, :2], draws[:, 2].bool()
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = offsets[:, :1] + ar_h  # (B, H)
    # A flipped image reads its window's columns right to left.
    cols = offsets[:, 1:] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)  # (B, W)
    batch_idx = torch.arange(b, device=x.device)[:, None, None, None]
    chan_idx = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch_idx, chan_idx, rows[:, None, :, None], cols[:, None, None, :]]


def _copy_to(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``. From the CPU to a GPU the copy goes through page-locked memory without blocking: a
    copy from pageable memory would make the host wait for every kernel queued before it."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def augment_generator(seed: int, epoch: int, batch_idx: int, rank: int = 0) -> torch.Generator:
    """A CPU generator seeded from ``(seed, epoch, batch_idx, rank)`` alone.

    The four numbers are mixed by NumPy's ``SeedSequence``, so neighbouring batches and epochs get unrelated
    streams.

    Args:
        seed: the data module's seed (its ``shuffle_seed``).
        epoch: the training epoch.
        batch_idx: the batch's position in the epoch (0 for the first).
        rank: the process's global rank under DDP.

    Returns:
        A fresh ``torch.Generator`` on the CPU.
    """
    state = np.random.SeedSequence([seed, epoch, batch_idx, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) % (2**63 - 1))
