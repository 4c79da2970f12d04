"""Seconds of CIFAR10DataModule.setup() with an empty decode cache, then with the cache it wrote.

Uses a fresh temporary cache folder (deleted afterwards) unless ``--cache-dir`` is given. ``--image-folder`` times
ImageFolderDataModule instead, on ``train/<class>/*`` and ``test/<class>/*`` folders (the same cache)::

    python benchmarks/cifar10_cache_time.py --data-dir ../shared/data
    python benchmarks/cifar10_cache_time.py --data-dir /tmp/cifar10-folders --image-folder
"""

from __future__ import annotations

import argparse
import tempfile
import time

from lightning_advsel.data import CIFAR10DataModule, ImageFolderDataModule


def setup_times(data_dir: str, cache_dir: str, val_size: int = 5000, runs: int = 2,
                module: type = CIFAR10DataModule) -> list[dict]:
    """Time ``runs`` setups of fresh data modules (``module``) sharing ``cache_dir``; one row per setup, in order."""
    rows = []
    for i in range(runs):
        dm = module(data_dir=data_dir, cache_dir=cache_dir, val_size=val_size)
        start = time.perf_counter()
        dm.setup()
        rows.append({"setup": i + 1, "seconds": time.perf_counter() - start, "from_cache": dm.loaded_from_cache,
                     "train": len(dm.train_set), "val": len(dm.val_set), "test": len(dm.test_set)})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True, help="folder holding a CIFAR-10 copy")
    parser.add_argument("--cache-dir", default=None, help="cache folder (default: a new temporary one)")
    parser.add_argument("--val-size", type=int, default=5000, help="training images held out, as in the configs")
    parser.add_argument("--image-folder", action="store_true", help="time ImageFolderDataModule on image folders")
    args = parser.parse_args(argv)
    module = ImageFolderDataModule if args.image_folder else CIFAR10DataModule
    with tempfile.TemporaryDirectory() as tmp:
        rows = setup_times(args.data_dir, args.cache_dir or tmp, args.val_size, module=module)
    print("| setup | from cache | seconds | train / val / test |\n| ---: | --- | ---: | --- |")
    for r in rows:
        print(f"| {r['setup']} | {r['from_cache']} | {r['seconds']:.1f} | {r['train']} / {r['val']} / {r['test']} |")
    return rows


if __name__ == "__main__":
    main()
