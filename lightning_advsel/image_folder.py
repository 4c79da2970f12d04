"""A user's image folders read into uint8 tensors, decoded once into the cache CIFAR-10 uses.

The layout is ``train/<class>/...``, ``test/<class>/...`` and, optionally, ``val/<class>/...`` under ``data_dir``
(torchvision's ``ImageFolder`` layout, one folder per split). The classes are the sorted names of ``train/``'s
subfolders, and a class's label is its position in that order. Every file inside a class folder, at any depth,
must be an image Pillow reads (PNG, JPEG, BMP, WebP, ...); names starting with ``.`` are skipped. Images are
ordered by (label, path), so the same folders give the same tensors on every machine.

Sizes: without ``image_size`` every image must have the size of the first, and mixed sizes are refused naming
the file. With ``image_size`` images of that size are kept as they are; any other is scaled (bilinear, with
Pillow's antialiasing) to the smallest size that covers ``image_size`` with its aspect ratio kept, then
center-cropped to it, as torchvision's ``Resize`` + ``CenterCrop`` do.

Memory: the whole data set is held in memory as uint8, ``images x channels x height x width`` bytes (CIFAR-10:
184 MB; 100,000 64x64 RGB images: 1.2 GB), once per process (each DDP rank holds its own copy), and decoding
needs it once more. It suits data sets that fit in memory a few times over; above ``max_memory_gib`` (4 GiB by
default) the folders are refused before any decoding, with the size they would take: raise the limit, state a
smaller ``image_size``, or read larger data sets with a streaming loader (torchvision's ``ImageFolder``).

The cache file (:mod:`lightning_advsel.image_cache`) is keyed on every image's relative path, size and
modification time, and on ``image_size`` and ``channels``: a changed folder, or other settings, decode again.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lightning_advsel import image_cache

SPLITS = ("train", "val", "test")
REQUIRED_SPLITS = ("train", "test")
MODES = {1: "L", 3: "RGB"}  # channels -> Pillow's mode


@dataclass(frozen=True)
class FolderImages:
    """A folder's splits as tensors: images uint8 ``(N, C, H, W)``, labels int64 ``(N,)``.

    Attributes:
        classes: the class names, in label order.
        splits: ``{"train": (x, y), "test": (x, y)}``, with ``"val"`` when the folder has ``val/``.
        source: the folder read.
        from_cache: ``True`` when the images came from the decode cache (nothing was decoded).
    """

    classes: tuple[str, ...]
    splits: dict[str, tuple[Tensor, Tensor]]
    source: Path
    from_cache: bool


def visible(paths: Sequence[Path]) -> list[Path]:
    """``paths`` without those whose name starts with ``.`` (``.DS_Store``, ``.ipynb_checkpoints``, ...)."""
    return [p for p in paths if not p.name.startswith(".")]


def class_names(data_dir: str | os.PathLike) -> tuple[str, ...]:
    """The sorted names of ``data_dir/train``'s subfolders: the classes, in label order.

    Raises:
        FileNotFoundError: if ``data_dir/train`` is not a folder, or holds no class folder.
    """
    train = Path(data_dir) / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"no image folders under data_dir={str(data_dir)!r}: expected {train}/<class>/* "
                                f"and {Path(data_dir) / 'test'}/<class>/* (optionally val/<class>/*)")
    classes = tuple(sorted(p.name for p in visible(list(train.iterdir())) if p.is_dir()))
    if not classes:
        raise FileNotFoundError(f"{train} holds no class folders: expected {train}/<class>/<image files>")
    return classes


def list_images(data_dir: str | os.PathLike) -> tuple[tuple[str, ...], dict[str, list[tuple[int, str]]], list[str]]:
    """The classes; per split present, its ``(label, path relative to data_dir)`` pairs ordered by (label, path);
    and the cache key's line of every file (:func:`~lightning_advsel.image_cache.file_lines`'s form), in the same order.

    Raises:
        FileNotFoundError: if ``train/`` (with class folders) or ``test/`` is missing.
        ValueError: for a class folder without images, or a ``test/`` or ``val/`` class that ``train/`` lacks,
            naming the folder.
    """
    root = Path(data_dir)
    classes = class_names(root)
    missing = [str(root / split) for split in REQUIRED_SPLITS if not (root / split).is_dir()]
    if missing:
        raise FileNotFoundError(f"no {missing[0]} folder: expected {root}/train/<class>/* and {root}/test/<class>/* "
                                f"(optionally val/<class>/*)")
    files: dict[str, list[tuple[int, str]]] = {}
    lines: list[str] = []
    for split in (s for s in SPLITS if (root / s).is_dir()):
        files[split] = []
        for folder in sorted(visible([p for p in (root / split).iterdir() if p.is_dir()])):
            if folder.name not in classes:
                raise ValueError(f"class folder {folder} has no counterpart in {root / 'train'}, whose classes are "
                                 f"{list(classes)}: a {split} class must be a training class (remove or rename it)")
            images = sorted(_files_below(folder, f"{split}/{folder.name}"))
            if not images:
                raise ValueError(f"class folder {folder} holds no images; add images or remove the folder")
            files[split] += [(classes.index(folder.name), relative) for relative, _ in images]
            lines += [f"{relative}\t{size}\t{mtime}" for relative, (size, mtime) in images]
    return classes, files, lines


def load_image_folder(data_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                      image_size: tuple[int, int] | None = None, channels: int = 3,
                      max_memory_gib: float = 4.0, prepare: bool = False) -> FolderImages | None:
    """Read ``data_dir``'s image folders (see the module docstring), decoding them at most once.

    Args:
        data_dir: folder holding ``train/``, ``test/`` and optionally ``val/``; only read.
        cache_dir: writable folder for the decoded tensors (:func:`~lightning_advsel.image_cache.default_cache_dir`
            if ``None``).
        image_size: ``(height, width)`` in pixels that every image is brought to; ``None``: all images must share
            one size.
        channels: 3 (RGB; grey images are repeated) or 1 (grey; colour images are converted).
        max_memory_gib: the most GiB the decoded uint8 images may take; more are refused before decoding.
        prepare: only make sure the cache file exists (decode unless it does), and return ``None``.

    Raises:
        FileNotFoundError, ValueError: as :func:`list_images`; ``ValueError`` also for a file that is not an image,
            an image of another size without ``image_size`` (naming both files), or images above
            ``max_memory_gib``.
        PermissionError: if ``cache_dir`` cannot be created or written.
    """
    root = Path(data_dir)
    classes, files, lines = list_images(root)
    settings = f"image-folder\timage_size={image_size}\tchannels={channels}\tclasses={list(classes)}"
    cache_file = image_cache.cache_file("image-folder", "\n".join([settings, *lines]), cache_dir)
    if prepare and cache_file.is_file():
        return None
    cached = None if prepare else image_cache.load(cache_file)
    if cached is not None:
        splits = {split: (cached[f"{split}_x"], cached[f"{split}_y"]) for split in files}
        return FolderImages(classes, splits, root, from_cache=True)
    first = root / files["train"][0][1]
    size = image_size or _read(first, channels, None, None).shape[:2]
    needed = len(lines) * channels * size[0] * size[1]
    if needed > max_memory_gib * 2**30:
        raise ValueError(
            f"the {len(lines)} images under {root} take {needed / 2**30:.1f} GiB decoded as {size[0]}x{size[1]}x"
            f"{channels} uint8, above `max_memory_gib`={max_memory_gib}: raise it if the memory is there (each DDP "
            f"rank holds a copy), state a smaller `image_size`, or read them with a streaming loader")
    splits = {}
    for split, entries in files.items():
        images = np.empty((len(entries), size[0], size[1], channels), dtype=np.uint8)
        # One file at a time: Pillow decodes one image per call, and the loop names the file that fails.
        for i, (_, relative) in enumerate(entries):
            images[i] = _read(root / relative, channels, image_size, (first, size))
        labels = torch.tensor([label for label, _ in entries], dtype=torch.long)
        splits[split] = (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels)
    image_cache.save(cache_file, {f"{split}_{part}": t for split, pair in splits.items()
                                  for part, t in zip("xy", pair, strict=True)})
    return None if prepare else FolderImages(classes, splits, root, from_cache=False)


def _files_below(folder: Path, relative: str) -> list[tuple[str, tuple[int, int]]]:
    """Every visible file under ``folder`` (``relative`` to the data folder), at any depth, as its relative path
    and ``(size, modification time in ns)``; hidden folders are not entered. One ``stat`` per file: a folder of
    60,000 images is listed in well under a second."""
    out = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                out += _files_below(Path(entry.path), f"{relative}/{entry.name}")
            elif entry.is_file():
                stat = entry.stat()
                out.append((f"{relative}/{entry.name}", (stat.st_size, stat.st_mtime_ns)))
    return out


def _read(path: Path, channels: int, image_size: tuple[int, int] | None,
          expected: tuple[Path, tuple[int, int]] | None) -> np.ndarray:
    """The pixels of ``path``, ``(H, W, channels)`` uint8: resized to ``image_size`` if given, else checked against
    the ``expected`` size of the first image (``(first path, (H, W))``)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert(MODES[channels])
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{path} is not an image Pillow can read ({err}); remove it from the class folder (files "
                         f"whose name starts with '.' are skipped)") from err
    if image_size is not None and (image.height, image.width) != tuple(image_size):
        image = _cover_and_crop(image, image_size)
    elif image_size is None and expected is not None and (image.height, image.width) != tuple(expected[1]):
        first, (h, w) = expected
        raise ValueError(f"{path} is {image.width}x{image.height} pixels but {first} is {w}x{h}: images of several "
                         f"sizes need a stated `image_size` (height and width to bring them to)")
    pixels = np.asarray(image)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def _cover_and_crop(image, size: tuple[int, int]):  # noqa: ANN001, ANN202 - PIL images
    """``image`` scaled to cover ``size`` (height, width) with its aspect ratio kept, then center-cropped to it."""
    from PIL import Image

    h, w = size
    scale = max(h / image.height, w / image.width)
    new_w, new_h = max(w, math.ceil(image.width * scale - 1e-6)), max(h, math.ceil(image.height * scale - 1e-6))
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - w) // 2, (new_h - h) // 2
    return image.crop((left, top, left + w, top + h))
