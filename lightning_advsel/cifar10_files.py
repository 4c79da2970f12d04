"""Read CIFAR-10 from whichever copy ``data_dir`` holds, into uint8 tensors, with a decode-once cache.

Three sources are recognised, looked for in this order:

1. ``data_dir/cifar-10-batches-py``: the original python batches (``data_batch_1`` ... ``data_batch_5``,
   ``test_batch``), read directly; they need no cache.
2. ``cifar10-jpeg.tar.gz`` at ``data_dir`` or at ``data_dir/cifar10-jpeg/``: the JPEG export of CIFAR-10
   (``train/<class>/*.jpg``, ``test/<class>/*.jpg``), read from the archive without extracting it.
3. The extracted JPEG folders ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` at ``data_dir`` or at
   ``data_dir/cifar10-jpeg/``.

JPEGs are decoded once into a uint8 tensor file in ``cache_dir`` (:mod:`lightning_advsel.image_cache`; never in
``data_dir``, which may be read-only); later loads read that file. The cache file is named by a key of its
source: for the archive, the archive's size and modification time; for the folders, a hash of every image's
relative path, size and modification time. Changing the source changes the key, and the next load decodes
again. Class folders are
CIFAR-10's class names; sorted, they are its label order. Images are ordered by (label, file name), so the
archive and its extracted folders give the same tensors.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lightning_advsel import image_cache
from lightning_advsel.image_cache import default_cache_dir  # noqa: F401 - this module's name for it, as before

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BATCHES_DIR = "cifar-10-batches-py"
ARCHIVE_NAME = "cifar10-jpeg.tar.gz"
JPEG_DIR = "cifar10-jpeg"
SPLITS = ("train", "test")
_JPEG_SUFFIXES = (".jpg", ".jpeg")


@dataclass(frozen=True)
class Cifar10Tensors:
    """CIFAR-10 as tensors: images uint8 ``(N, 3, 32, 32)``, labels int64 ``(N,)``.

    Attributes:
        train_x, train_y: the 50,000 training images and labels (before any validation split).
        test_x, test_y: the 10,000 test images and labels.
        source: the folder or archive that was read.
        from_cache: ``True`` when the images came from the decode cache (no JPEG was decoded).
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    source: Path
    from_cache: bool


def find_source(data_dir: str | os.PathLike) -> tuple[str, Path] | None:
    """Which CIFAR-10 copy ``data_dir`` holds: ``("batches" | "archive" | "folders", path)``, or ``None``."""
    root = Path(data_dir)
    if (root / BATCHES_DIR).is_dir():
        return "batches", root / BATCHES_DIR
    for folder in (root, root / JPEG_DIR):
        if (folder / ARCHIVE_NAME).is_file():
            return "archive", folder / ARCHIVE_NAME
    for folder in (root, root / JPEG_DIR):
        if all((folder / split).is_dir() for split in SPLITS):
            return "folders", folder
    return None


def describe_sources(data_dir: str | os.PathLike) -> str:
    """The places :func:`find_source` looks at, for error messages."""
    root = Path(data_dir)
    return (f"{root / BATCHES_DIR}, {root / ARCHIVE_NAME}, {root / JPEG_DIR / ARCHIVE_NAME}, "
            f"or the folders train/<class>/*.jpg and test/<class>/*.jpg under {root} or {root / JPEG_DIR}")


def load_cifar10(data_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Cifar10Tensors:
    """Load CIFAR-10 from ``data_dir`` (see the module docstring for the sources), decoding JPEGs at most once.

    Args:
        data_dir: folder holding one of the recognised copies; only read.
        cache_dir: writable folder for the decoded tensors (:func:`default_cache_dir` if ``None``).

    Returns:
        The training and test tensors, the source read and whether the cache served them.

    Raises:
        FileNotFoundError: if ``data_dir`` holds no recognised copy, or the python batches are incomplete.
        ValueError: for an archive that is truncated, not a gzipped tar, or not laid out as CIFAR-10's JPEG
            export, for a JPEG that does not decode to a 32x32 image, or for a python batch that is not one.
        PermissionError: if ``cache_dir`` cannot be created or written.
    """
    kind, path = _require_source(data_dir)
    if kind == "batches":
        return _read_batches(path)
    cache_file = _cache_file(kind, path, cache_dir)
    cached = image_cache.load(cache_file)
    if cached is not None:
        return Cifar10Tensors(cached["train_x"], cached["train_y"], cached["test_x"], cached["test_y"], source=path,
                              from_cache=True)
    return _decode_to_cache(kind, path, cache_file)


def prepare_cifar10(data_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> None:
    """Decode a JPEG copy into the cache unless a cache file for it exists; python batches need nothing.

    Raises:
        The same as :func:`load_cifar10`.
    """
    kind, path = _require_source(data_dir)
    if kind != "batches":
        cache_file = _cache_file(kind, path, cache_dir)
        if not cache_file.is_file():
            _decode_to_cache(kind, path, cache_file)


def _require_source(data_dir: str | os.PathLike) -> tuple[str, Path]:
    found = find_source(data_dir)
    if found is None:
        raise FileNotFoundError(f"no CIFAR-10 copy under data_dir={str(data_dir)!r}: looked for "
                                f"{describe_sources(data_dir)}")
    return found


def _cache_file(kind: str, path: Path, cache_dir: str | os.PathLike | None) -> Path:
    if kind == "archive":
        stat = path.stat()
        source_text = f"archive\t{stat.st_size}\t{stat.st_mtime_ns}"
    else:
        paths = [p for split in SPLITS for p in sorted((path / split).glob("*/*"))]
        source_text = "folders\n" + "\n".join(image_cache.file_lines(path, paths))
    return image_cache.cache_file("cifar10-jpeg", source_text, cache_dir)


def _decode_to_cache(kind: str, path: Path, cache_file: Path) -> Cifar10Tensors:
    files = _archive_members(path) if kind == "archive" else _folder_files(path)
    train, test = (_decode(files[split], path) for split in SPLITS)
    image_cache.save(cache_file, {"train_x": train[0], "train_y": train[1], "test_x": test[0], "test_y": test[1]})
    return Cifar10Tensors(*train, *test, source=path, from_cache=False)


Entry = tuple[int, str, bytes]  # (label, name for ordering and errors, JPEG bytes)


def _member_entry(parts: tuple[str, ...], where: Path) -> tuple[str, int] | None:
    """``(split, label)`` of ``.../<split>/<class>/<file>.jpg``, ``None`` for other paths (skipped)."""
    if len(parts) < 3 or parts[-3] not in SPLITS or not parts[-1].lower().endswith(_JPEG_SUFFIXES):
        return None
    if parts[-2] not in CLASSES:
        raise ValueError(f"{where} is not CIFAR-10's JPEG layout: class folder {parts[-2]!r} in "
                         f"{'/'.join(parts)!r} is not one of {list(CLASSES)}")
    return parts[-3], CLASSES.index(parts[-2])


def _archive_members(archive: Path) -> dict[str, list[Entry]]:
    files: dict[str, list[Entry]] = {split: [] for split in SPLITS}
    try:
        with tarfile.open(archive, "r|gz") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = tuple(member.name.split("/"))
                entry = _member_entry(parts, archive)
                if entry is None:
                    continue
                data = tar.extractfile(member)
                files[entry[0]].append((entry[1], member.name, data.read() if data is not None else b""))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise ValueError(f"CIFAR-10 archive {archive} is truncated or not a gzipped tar ({type(err).__name__}: "
                         f"{err}); replace it with a complete copy of {ARCHIVE_NAME}") from err
    return files


def _folder_files(root: Path) -> dict[str, list[Entry]]:
    files: dict[str, list[Entry]] = {split: [] for split in SPLITS}
    for split in SPLITS:
        for path in (root / split).glob("*/*"):
            parts = path.relative_to(root).parts
            entry = _member_entry(parts, root) if path.is_file() else None
            if entry is not None:
                files[split].append((entry[1], path.relative_to(root).as_posix(), path.read_bytes()))
    return files


def _decode(entries: Iterable[Entry], source: Path) -> tuple[Tensor, Tensor]:
    # Pillow rather than torchvision.io: torchvision's image decoders are deprecated since 0.29.
    from PIL import Image, UnidentifiedImageError

    entries = sorted(entries, key=lambda e: (e[0], e[1].rsplit("/", 1)[-1]))
    labels = torch.tensor([label for label, _, _ in entries], dtype=torch.long)
    if len(entries) == 0 or labels.unique().numel() != len(CLASSES):
        present = sorted({CLASSES[i] for i in labels.tolist()})
        raise ValueError(f"{source} is not CIFAR-10's JPEG layout: expected train/<class>/*.jpg and "
                         f"test/<class>/*.jpg for all of {list(CLASSES)}, found images of {present}")
    images = np.empty((len(entries), 32, 32, 3), dtype=np.uint8)
    # A JPEG decoder takes one file at a time; decoding in a loop also names the file that fails.
    for i, (_, name, data) in enumerate(entries):
        try:
            with Image.open(io.BytesIO(data)) as image:
                pixels = np.asarray(image.convert("RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ValueError(f"{name} in {source} is not a readable JPEG ({err})") from err
        if pixels.shape != (32, 32, 3):
            raise ValueError(f"{name} in {source} is {pixels.shape[1]}x{pixels.shape[0]} pixels; CIFAR-10 images "
                             f"are 32x32")
        images[i] = pixels
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def _read_batches(folder: Path) -> Cifar10Tensors:
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    missing = [str(folder / n) for split in SPLITS for n in names[split] if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 python batches in {folder} are incomplete: missing {missing}")
    out = []
    for split in SPLITS:
        xs, ys = [], []
        for name in names[split]:
            path = folder / name
            try:
                with open(path, "rb") as f:
                    batch = pickle.load(f, encoding="latin1")
                data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                labels = np.asarray(batch["labels"], dtype=np.int64)
                if len(labels) != len(data) or labels.min() < 0 or labels.max() >= len(CLASSES):
                    raise ValueError(f"{len(data)} images, {len(labels)} labels in [{labels.min()}, {labels.max()}]")
            except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path} is not a CIFAR-10 python batch ({type(err).__name__}: {err})") from err
            xs.append(torch.from_numpy(data))
            ys.append(torch.from_numpy(labels))
        out += [torch.cat(xs), torch.cat(ys)]
    return Cifar10Tensors(*out, source=folder, from_cache=False)
