"""Images decoded once into uint8 tensors, kept in a cache file named by a key of the source files.

CIFAR-10's JPEG copy (:mod:`lightning_advsel.cifar10_files`) and a user's image folders
(:mod:`lightning_advsel.image_folder`) share this cache: a file ``<prefix>-<key>.pt`` in ``cache_dir`` (never in
the data folder, which may be read-only), holding a dict of tensors saved with ``torch.save`` and read with
``weights_only=True``. The key is a hash of the cache format and of a text describing the source (for folders,
every image's relative path, size and modification time), so a changed source is decoded again. Files are
written to a temporary name and renamed, so a reader (another DDP rank, a second job) never sees half a file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

CACHE_FORMAT = 1  # bump when a cache file's contents change meaning


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lightning_advsel``, else ``~/.cache/lightning_advsel``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lightning_advsel"


def cache_file(prefix: str, source_text: str, cache_dir: str | os.PathLike | None) -> Path:
    """The cache file for a source described by ``source_text``: ``<cache_dir>/<prefix>-<key>.pt``.

    Raises:
        PermissionError: if ``cache_dir`` (:func:`default_cache_dir` if ``None``) cannot be created or written.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    _check_writable(cache)
    key = hashlib.sha256(f"{CACHE_FORMAT}\n{source_text}".encode()).hexdigest()[:20]
    return cache / f"{prefix}-{key}.pt"


def file_lines(root: Path, paths: list[Path]) -> list[str]:
    """One line per file for a cache key: its path relative to ``root``, size and modification time."""
    lines = []
    for path in paths:
        stat = path.stat()
        lines.append(f"{path.relative_to(root).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}")
    return lines


def load(path: Path) -> dict[str, Any] | None:
    """The tensors saved in ``path``, or ``None`` if it is missing, unreadable or of another format."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable cache is rebuilt, whatever broke it
        return None
    if not isinstance(blob, dict) or blob.get("format") != CACHE_FORMAT:
        return None
    return blob


def save(path: Path, tensors: dict[str, Any]) -> None:
    """Write ``tensors`` (and the format) to ``path`` atomically: to a temporary name, then renamed."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save({"format": CACHE_FORMAT, **tensors}, tmp)
    os.replace(tmp, path)


def _check_writable(cache: Path) -> None:
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"`cache_dir` {str(cache)!r} cannot be created ({err}); pass a writable folder "
                              f"as cache_dir (--data.init_args.cache_dir)") from err
    if not os.access(cache, os.W_OK):
        raise PermissionError(f"`cache_dir` {str(cache)!r} is not writable; pass a writable folder as cache_dir "
                              f"(--data.init_args.cache_dir)")
