"""A user's image folders: ``ImageFolderDataModule`` on CIFAR-10's JPEG copy extracted (the same classes, counts,
labels and pixels as ``CIFAR10DataModule``), through the CLI with a small WideResNet, and on tiny folders built in
``tmp_path`` for the rules: sizes, validation folder, bad input, cache and the device augmentation."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, config_args
from PIL import Image

from lightning_advsel import cifar10_files, image_folder
from lightning_advsel.augment import augment_generator, random_crop_flip
from lightning_advsel.cli import build_cli
from lightning_advsel.data import CIFAR10DataModule, ImageFolderDataModule

ARCHIVE = SHARED_DATA / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def cifar_folders(tmp_path_factory):
    """The JPEG archive extracted once into a temporary folder (never into the shared one), read once through
    ImageFolderDataModule into a fresh cache."""
    assert ARCHIVE.is_file(), f"the CIFAR-10 JPEG archive must be at {ARCHIVE}"
    root = tmp_path_factory.mktemp("cifar10_folders")
    with tarfile.open(ARCHIVE) as archive:
        archive.extractall(root, filter="data")
    cache = tmp_path_factory.mktemp("image_folder_cache")
    dm = ImageFolderDataModule(data_dir=str(root), val_size=5000, cache_dir=str(cache))
    dm.setup()
    return {"root": root, "cache": cache, "dm": dm}


def test_cifar10_folders_give_cifar10s_classes_counts_labels_and_pixels(cifar_folders, tmp_path):
    dm = cifar_folders["dm"]
    assert dm.classes == cifar10_files.CLASSES and dm.num_classes == 10 and dm.loaded_from_cache is False
    reference = CIFAR10DataModule(data_dir=str(cifar_folders["root"]), cache_dir=str(tmp_path))
    reference.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (45000, 5000, 10000)
    # The same images in the same order, so the same seeded split, labels and pixels.
    assert dm.train_set.indices == reference.train_set.indices and dm.val_set.indices == reference.val_set.indices
    ours, theirs = dm.train_set.dataset.tensors, reference.train_set.dataset.tensors
    assert torch.equal(ours[1], theirs[1]) and torch.equal(ours[0], theirs[0])
    assert torch.equal(dm.test_set.labels, reference.test_set.labels)
    assert torch.equal(dm.test_set.images, reference.test_set.images)
    labels = dm.train_set.dataset.tensors[1]
    assert torch.equal(labels.bincount(minlength=10), torch.full((10,), 5000))
    assert torch.equal(dm.test_set.labels.bincount(minlength=10), torch.full((10,), 1000))
    # The training split's statistics, against the data README's (measured on a 2,000-image sample).
    assert dm.mean == pytest.approx((0.491, 0.481, 0.444), abs=0.01) and dm.std == pytest.approx((0.246, 0.244, 0.262),
                                                                                                 abs=0.01)


def test_a_second_setup_loads_the_cache_without_decoding(cifar_folders, monkeypatch):
    monkeypatch.setattr(image_folder, "_read", lambda *a: pytest.fail("an image was decoded"))
    again = ImageFolderDataModule(data_dir=str(cifar_folders["root"]), val_size=5000,
                                  cache_dir=str(cifar_folders["cache"]))
    again.setup()
    assert again.loaded_from_cache is True and len(list(cifar_folders["cache"].glob("image-folder-*.pt"))) == 1
    assert torch.equal(again.test_set.images, cifar_folders["dm"].test_set.images)
    assert again.mean == cifar_folders["dm"].mean


def test_a_small_wide_resnet_fits_on_the_folders_through_the_cli(cifar_folders, tmp_path, monkeypatch):
    # As a user runs it, Lightning's defaults on (progress bar, logger, checkpointing); a few batches long.
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["fit", *config_args("cifar10/base.yaml", "data/image_folder.yaml", "models/wrn28_10.yaml",
                                         "recipes/robust.yaml"),
                     "--data.init_args.data_dir", str(cifar_folders["root"]),
                     "--data.init_args.cache_dir", str(cifar_folders["cache"]), "--data.init_args.batch_size", "16",
                     "--model.init_args.model.init_args.depth", "10", "--model.init_args.model.init_args.widen_factor",
                     "1", "--model.init_args.train_attack.steps", "1", "--model.init_args.eval_attack.steps", "1",
                     "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
                     "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0"])
    assert type(cli.model.model).__name__ == "WideResNet" and cli.model.model.fc.in_features == 64
    assert cli.datamodule.loaded_from_cache is True and cli.trainer.global_step == 3
    log_dir = tmp_path / "lightning_logs" / "cifar10" / "image_folder" / "wrn28_10" / "robust" / "version_0"
    assert (log_dir / "checkpoints" / "last.ckpt").is_file() and list(log_dir.glob("events.out.tfevents.*"))


# ------------------------------------------------------------------------------------------ tiny folders
def write_image(path: Path, size: tuple[int, int] = (8, 8), color: tuple[int, int, int] = (10, 200, 30),
                mode: str = "RGB") -> None:
    """A PNG of one colour (lossless, so its pixels are known), ``size`` as (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(path, format="PNG")


def folders(root: Path, counts: dict[str, dict[str, int]], size: tuple[int, int] = (8, 8)) -> Path:
    """``root/<split>/<class>/<i>.png``, ``counts[split][class]`` images of each, coloured by class and index."""
    for split, classes in counts.items():
        for c, (name, n) in enumerate(sorted(classes.items())):
            for i in range(n):
                write_image(root / split / name / f"{i:03d}.png", size, (20 * c, 5 * i, 100))
    return root


SMALL = {"train": {"cat": 6, "dog": 6, "emu": 4}, "test": {"cat": 2, "dog": 3, "emu": 1}}


def small(tmp_path: Path, write: bool = True, **kwargs) -> ImageFolderDataModule:
    """A data module on ``tmp_path/data`` (written with ``SMALL`` first, unless ``write`` is false), set up."""
    if write:
        folders(tmp_path / "data", SMALL)
    dm = ImageFolderDataModule(data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"),
                               **{"val_size": 4, "batch_size": 4, **kwargs})
    dm.setup()
    return dm


def test_classes_come_from_the_training_folders_before_setup(tmp_path):
    folders(tmp_path / "data", SMALL)
    dm = ImageFolderDataModule(data_dir=str(tmp_path / "data"), val_size=4)
    assert dm.classes == ("cat", "dog", "emu") and dm.num_classes == 3  # nothing decoded yet
    dm = small(tmp_path)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (12, 4, 6)
    x, y = dm.test_set[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and 0 <= int(y) < 3
    assert sorted(dm.test_set.labels.tolist()) == [0, 0, 1, 1, 1, 2]


def test_a_val_folder_is_the_validation_set_and_val_size_must_then_be_left_out(tmp_path):
    folders(tmp_path / "data", {**SMALL, "val": {"dog": 2, "cat": 1}})
    args = {"data_dir": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache"), "batch_size": 4}
    dm = ImageFolderDataModule(**args, train_size=10)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (10, 3)
    assert sorted(dm.val_set.labels.tolist()) == [0, 1, 1]
    with pytest.raises(ValueError, match=rf"`val_size` must be None when {tmp_path / 'data' / 'val'} holds"):
        ImageFolderDataModule(**args, val_size=2).setup()
    (tmp_path / "bare").mkdir()
    folders(tmp_path / "bare", SMALL)
    with pytest.raises(ValueError, match=rf"`val_size` must be stated .* no {tmp_path / 'bare' / 'val'} folder"):
        ImageFolderDataModule(**{**args, "data_dir": str(tmp_path / "bare")}).setup()


def test_images_of_another_size_are_scaled_to_cover_and_center_cropped(tmp_path):
    root = folders(tmp_path / "data", SMALL)
    # 16 wide, 8 high: scaled by 1 (it already covers 8x8), then its middle 8 columns kept.
    image = np.zeros((8, 16, 3), dtype=np.uint8)
    image[:, 4:12] = 255
    Image.fromarray(image).save(root / "train" / "cat" / "wide.png")
    dm = ImageFolderDataModule(data_dir=str(root), cache_dir=str(tmp_path / "cache"), val_size=2, image_size=8,
                               batch_size=4)
    dm.setup()
    images = dm.train_set.dataset.tensors[0]
    assert images.shape[1:] == (3, 8, 8)
    assert any(bool((x == 255).all()) for x in images)  # the white middle, nothing of the black sides
    grey = ImageFolderDataModule(data_dir=str(root), cache_dir=str(tmp_path / "cache"), val_size=2,
                                 image_size=[4, 6], channels=1, batch_size=4)
    grey.setup()
    assert grey.test_set.images.shape[1:] == (1, 4, 6)
    with pytest.raises(ValueError, match=r"wide.png is 16x8 pixels but .*cat/000.png is 8x8: images of several "
                                         r"sizes need a stated `image_size`"):
        ImageFolderDataModule(data_dir=str(root), cache_dir=str(tmp_path / "cache"), val_size=2, batch_size=4).setup()


@pytest.mark.parametrize("breakage,match", [
    ("empty", r"class folder .*train/fox holds no images"),
    ("text", r".*train/dog/notes.txt is not an image Pillow can read"),
    ("test_only", r"class folder .*test/yak has no counterpart in .*train, whose classes are \['cat', 'dog', 'emu'\]"),
    ("no_test", r"no .*data/test folder"),
])
def test_bad_folders_are_refused_naming_the_path(tmp_path, breakage, match):
    root = folders(tmp_path / "data", SMALL)
    if breakage == "empty":
        (root / "train" / "fox").mkdir()
    elif breakage == "text":
        (root / "train" / "dog" / "notes.txt").write_text("not an image")
    elif breakage == "test_only":
        write_image(root / "test" / "yak" / "0.png")
    else:
        import shutil

        shutil.rmtree(root / "test")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0")  # hidden files are skipped, never refused
    dm = ImageFolderDataModule(data_dir=str(root), cache_dir=str(tmp_path / "cache"), val_size=2, batch_size=4)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        dm.setup()


def test_a_data_set_above_the_memory_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    folders(tmp_path / "data", SMALL)
    reads = []
    real_read = image_folder._read
    monkeypatch.setattr(image_folder, "_read", lambda *a: reads.append(a[0]) or real_read(*a))
    dm = ImageFolderDataModule(data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"), val_size=2,
                               image_size=1024, max_memory_gib=0.01)
    with pytest.raises(ValueError, match=r"the 22 images under .* take 0.1 GiB decoded as 1024x1024x3 uint8, above "
                                         r"`max_memory_gib`=0.01"):
        dm.setup()
    assert reads == []


def test_a_changed_image_is_decoded_again(tmp_path):
    dm = small(tmp_path)
    assert dm.loaded_from_cache is False and small(tmp_path, write=False).loaded_from_cache is True
    write_image(tmp_path / "data" / "test" / "cat" / "000.png", color=(255, 255, 255))
    again = small(tmp_path, write=False)
    assert again.loaded_from_cache is False and len(list((tmp_path / "cache").glob("image-folder-*.pt"))) == 2


def test_training_batches_are_augmented_on_the_device_as_cifar10s_and_carry_their_index(tmp_path):
    dm = small(tmp_path, return_index=True, padding=2)
    x, y, index = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and index.dtype == torch.long
    assert torch.equal(dm.train_set.dataset.tensors[1][[dm.train_set.indices[i] for i in index]], y)
    out = dm.training_batch((x, y, index), epoch=2, position=1, rank=0)
    expected = random_crop_flip(x, augment_generator(dm.shuffle_seed, 2, 1, 0), padding=2).float() / 255
    assert torch.equal(out[0], expected) and out[2] is index


@pytest.mark.parametrize("kwargs,match", [
    ({"image_size": 0}, r"`image_size` must be a positive integer or \[height, width\] of them, or None, got 0"),
    ({"image_size": [8, 8, 8]}, r"`image_size` must be .* got \[8, 8, 8\]"),
    ({"channels": 2}, r"`channels` must be one of \(1, 3\), got 2"),
    ({"max_memory_gib": 0}, r"`max_memory_gib` must be a finite number > 0 \(GiB\), got 0"),
    ({"val_size": 0}, r"`val_size` must be an integer >= 1 or None, got 0"),
    ({"padding": -1}, r"`padding` must be an integer >= 0, got -1"),
    ({"augment": "yes"}, r"`augment` must be true or false, got 'yes'"),
])
def test_arguments_are_checked_before_any_work(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        ImageFolderDataModule(data_dir=str(tmp_path / "missing"), **kwargs)


def test_cache_benchmark_times_the_image_folders_too(tmp_path, capsys):
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    from cifar10_cache_time import main

    folders(tmp_path / "data", {"train": {"a": 150, "b": 150}, "test": {"a": 1}})  # 296 training images: batch 256
    rows = main(["--data-dir", str(tmp_path / "data"), "--val-size", "4", "--image-folder"])
    assert [r["from_cache"] for r in rows] == [False, True] and (rows[0]["train"], rows[0]["test"]) == (296, 1)
    assert "| 2 | True |" in capsys.readouterr().out
