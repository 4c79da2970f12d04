"""CIFAR-10 from every copy ``data_dir`` may hold, the decode cache, and the seeded batch augmentation.

The real JPEG archive (``../shared/data/cifar10-jpeg/cifar10-jpeg.tar.gz``) is decoded once per session; the
other sources, broken archives and the cache invalidation use tiny fake copies built in ``tmp_path``.
"""

from __future__ import annotations

import io
import os
import pickle
import stat
import sys
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import REPO, SHARED_DATA, config_args
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torch import nn

from lightning_advsel import AdversarialSelectionModule, cifar10_files
from lightning_advsel.augment import augment_generator, random_crop_flip
from lightning_advsel.cli import build_cli
from lightning_advsel.data import CIFAR10DataModule

ARCHIVE = SHARED_DATA / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"
CLASSES = cifar10_files.CLASSES


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="session")
def real(tmp_path_factory):
    """The real archive read straight from the shared, read-only data folder, decoded once into a fresh cache."""
    if not ARCHIVE.is_file():
        pytest.skip(f"needs the CIFAR-10 JPEG archive at {ARCHIVE}")
    cache = tmp_path_factory.mktemp("cifar10_cache")
    before = tree(SHARED_DATA)
    dm = CIFAR10DataModule(data_dir=str(SHARED_DATA), cache_dir=str(cache))
    dm.setup()
    return {"dm": dm, "cache": cache, "tree_before": before}


def test_real_archive_gives_the_45000_5000_10000_split_with_balanced_classes(real):
    dm = real["dm"]
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (45000, 5000, 10000)
    train_labels = dm.train_set.dataset.tensors[1][dm.train_set.indices]
    val_labels = dm.val_set.dataset.labels[dm.val_set.indices]
    # The split is random, so the classes are balanced only over train + val together.
    assert torch.equal(torch.cat([train_labels, val_labels]).bincount(minlength=10), torch.full((10,), 5000))
    assert torch.equal(dm.test_set.labels.bincount(minlength=10), torch.full((10,), 1000))
    # The JPEG copy stores the test images class by class; the first 500 (a benchmark's subset) hold every class.
    assert dm.test_set.labels[:500].bincount(minlength=10).min() >= 30


def test_real_pixels_are_uint8_for_training_and_float_in_unit_range_for_evaluation(real):
    dm = real["dm"]
    images = dm.train_set.dataset.tensors[0]
    assert images.dtype == torch.uint8 and images.shape == (50000, 3, 32, 32)
    assert int(images.min()) == 0 and int(images.max()) == 255
    mean = images[::25].float().mean(dim=(0, 2, 3)) / 255  # 2,000 images, 200 of each class
    # The data README's per-channel mean of the JPEG copy: RGB channel order and the right scale.
    assert torch.allclose(mean, torch.tensor([0.491, 0.481, 0.444]), atol=0.01)
    for dataset in (dm.val_set, dm.test_set):
        x, y = dataset[7]
        assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1
        assert 0 <= int(y) < 10


def test_first_setup_decodes_and_a_second_setup_loads_the_cache_without_decoding(real, monkeypatch):
    assert real["dm"].loaded_from_cache is False
    assert len(list(real["cache"].glob("cifar10-jpeg-*.pt"))) == 1

    def no_decode(*args, **kwargs):
        raise AssertionError("a JPEG was decoded although the cache holds the data set")

    monkeypatch.setattr(cifar10_files, "_decode", no_decode)
    again = CIFAR10DataModule(data_dir=str(SHARED_DATA), cache_dir=str(real["cache"]))
    again.setup()
    assert again.loaded_from_cache is True
    assert torch.equal(again.test_set.images, real["dm"].test_set.images)
    assert again.val_set.indices == real["dm"].val_set.indices


def test_nothing_is_written_into_the_data_folder(real):
    assert tree(SHARED_DATA) == real["tree_before"]


def test_cifar10_config_trains_on_the_jpeg_copy_and_tests_its_best_checkpoint(real, tmp_path, capsys):
    common = [*config_args("cifar10/base.yaml", "recipes/ds.yaml"), "--data.init_args.data_dir", str(SHARED_DATA),
              "--data.init_args.cache_dir", str(real["cache"]), "--data.init_args.batch_size", "8",
              "--model.init_args.train_attack.steps", "1", "--model.init_args.eval_attack.steps", "1",
              "--trainer.accelerator", "cpu", "--trainer.logger.init_args.save_dir", str(tmp_path),
              "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2",
              "--trainer.enable_progress_bar", "false",
              # A small CNN instead of the config's ResNet-18: the test is about data and checkpoints.
              "--model.init_args.model", "lightning_advsel.models.SmallCNN",
              *[f"--model.init_args.model.init_args.{k}={v}" for k, v in
                (("in_channels", 3), ("input_size", 32), ("width", 8), ("hidden", 32))]]
    cli = build_cli(["fit", *common, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                     "--trainer.num_sanity_val_steps", "0"])
    assert cli.datamodule.loaded_from_cache is True and cli.trainer.global_step == 2
    best = list(tmp_path.rglob("best-*.ckpt"))
    assert len(best) == 1 and (best[0].parent / "last.ckpt").is_file()
    build_cli(["test", *common, "--ckpt_path", str(best[0])])
    assert "test accuracy: clean" in capsys.readouterr().out


def test_truncated_real_archive_is_refused_naming_the_file(tmp_path):
    if not ARCHIVE.is_file():
        pytest.skip(f"needs the CIFAR-10 JPEG archive at {ARCHIVE}")
    broken = tmp_path / "data" / "cifar10-jpeg.tar.gz"
    broken.parent.mkdir()
    with open(ARCHIVE, "rb") as f:
        broken.write_bytes(f.read(1_000_000))
    dm = CIFAR10DataModule(data_dir=str(broken.parent), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=rf"{broken}.*truncated"):
        dm.setup()
    assert not list((tmp_path / "cache").glob("*.pt"))


# ---------------------------------------------------------------------------------------------- tiny fake copies


def fake_images(n: int, seed: int) -> np.ndarray:
    """``n`` smooth random 32x32 RGB images (HWC uint8): smooth, so JPEG keeps them recognisable."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8)
    return coarse.repeat(8, axis=1).repeat(8, axis=2)


def jpeg_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95, subsampling=0)  # 4:4:4, near lossless
    return buf.getvalue()


def fake_jpeg_files(per_class: dict[str, int], seed: int = 0) -> dict[str, bytes]:
    """``{"train/<class>/NNNN.jpg": bytes}`` for every class, ``per_class[split]`` images each."""
    files = {}
    for s, (split, n) in enumerate(per_class.items()):
        for c, name in enumerate(CLASSES):
            for i, image in enumerate(fake_images(n, seed + 100 * s + c)):
                files[f"{split}/{name}/{i:04d}.jpg"] = jpeg_bytes(image)
    return files


def write_folders(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def write_archive(path: Path, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name in reversed(sorted(files)):  # an order other than the label order
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            tar.addfile(info, io.BytesIO(files[name]))
    return path


SMALL = {"train": 3, "test": 1}  # images per class


def test_archive_and_its_extracted_folders_give_the_same_tensors_in_label_order(tmp_path):
    files = fake_jpeg_files(SMALL)
    archive = write_archive(tmp_path / "a" / "cifar10-jpeg" / "cifar10-jpeg.tar.gz", files)
    folders = write_folders(tmp_path / "b", files)
    a = cifar10_files.load_cifar10(tmp_path / "a", tmp_path / "cache")
    b = cifar10_files.load_cifar10(folders, tmp_path / "cache")
    assert (a.source, b.source) == (archive, folders)
    assert not a.from_cache and not b.from_cache  # two sources, two cache files
    for left, right in ((a.train_x, b.train_x), (a.train_y, b.train_y), (a.test_x, b.test_x), (a.test_y, b.test_y)):
        assert torch.equal(left, right)
    assert a.train_x.shape == (30, 3, 32, 32) and a.test_x.shape == (10, 3, 32, 32)
    assert torch.equal(a.train_y, torch.arange(10).repeat_interleave(3))
    # Decoded pixels are the images that were written, up to JPEG's loss, in RGB order.
    original = torch.from_numpy(fake_images(3, 4)).permute(0, 3, 1, 2)  # train images of class 4, "deer"
    assert (a.train_x[12:15].int() - original.int()).abs().float().mean() < 3


def test_read_only_data_folder_works_and_stays_unchanged(tmp_path):
    root = write_folders(tmp_path / "data", fake_jpeg_files(SMALL))
    for path in [root, *root.rglob("*")]:
        path.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    before = tree(root)
    try:
        dm = CIFAR10DataModule(data_dir=str(root), val_size=5, batch_size=4, cache_dir=str(tmp_path / "cache"))
        dm.setup()
        assert len(dm.train_set) == 25 and len(dm.val_set) == 5 and len(dm.test_set) == 10
        assert tree(root) == before
    finally:
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755)


def test_a_changed_source_invalidates_the_cache(tmp_path):
    files = fake_jpeg_files(SMALL)
    archive = write_archive(tmp_path / "data" / "cifar10-jpeg.tar.gz", files)
    cache = tmp_path / "cache"
    first = cifar10_files.load_cifar10(archive.parent, cache)
    assert not first.from_cache and cifar10_files.load_cifar10(archive.parent, cache).from_cache
    # Same size, new modification time: the key (size + mtime) changes, so the archive is decoded again.
    os.utime(archive, ns=(archive.stat().st_atime_ns, archive.stat().st_mtime_ns + 10**9))
    assert not cifar10_files.load_cifar10(archive.parent, cache).from_cache

    folders = write_folders(tmp_path / "folders", files)
    assert not cifar10_files.load_cifar10(folders, cache).from_cache
    assert cifar10_files.load_cifar10(folders, cache).from_cache
    replaced = folders / "test" / "cat" / "0000.jpg"
    replaced.write_bytes(jpeg_bytes(np.zeros((32, 32, 3), dtype=np.uint8)))
    changed = cifar10_files.load_cifar10(folders, cache)
    assert not changed.from_cache and int(changed.test_x[3].max()) < 10  # test/cat is the 4th test image


@pytest.mark.parametrize("content,match", [
    ("not-gzip", r"not a gzipped tar"),
    ("foreign-tar", r"not CIFAR-10's JPEG layout"),
    ("unknown-class", r"class folder 'unicorn'.*not one of"),
    ("missing-class", r"not CIFAR-10's JPEG layout.*found images of"),
    ("bad-jpeg", r"test/truck/0000.jpg in .* is not a readable JPEG"),
])
def test_foreign_or_broken_archives_are_refused_naming_the_file(tmp_path, content, match):
    path = tmp_path / "data" / "cifar10-jpeg.tar.gz"
    if content == "not-gzip":
        path.parent.mkdir()
        path.write_bytes(b"this is not an archive" * 100)
    else:
        files = {"readme.txt": b"hello"} if content == "foreign-tar" else fake_jpeg_files(SMALL)
        if content == "unknown-class":
            files["train/unicorn/0000.jpg"] = files["train/cat/0000.jpg"]
        if content == "missing-class":
            files = {k: v for k, v in files.items() if "/ship/" not in k}
        if content == "bad-jpeg":
            files["test/truck/0000.jpg"] = b"\xff\xd8 truncated"
        write_archive(path, files)
    dm = CIFAR10DataModule(data_dir=str(path.parent), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=match) as info:
        dm.setup()
    assert str(path) in str(info.value)


def test_a_cache_dir_that_cannot_be_created_is_refused_before_decoding(tmp_path, monkeypatch):
    write_archive(tmp_path / "data" / "cifar10-jpeg.tar.gz", fake_jpeg_files(SMALL))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setattr(cifar10_files, "_archive_members", lambda *a: pytest.fail("read before the check"))
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "data"), cache_dir=str(blocker / "cache"))
    with pytest.raises(PermissionError, match=rf"`cache_dir` '{blocker / 'cache'}' cannot be created"):
        dm.setup()


def test_cache_dir_argument_is_checked_and_defaults_outside_the_data_folder(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"`cache_dir` must be a folder path or None.*3"):
        CIFAR10DataModule(cache_dir=3)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cifar10_files.default_cache_dir() == tmp_path / "lightning_advsel"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cifar10_files.default_cache_dir() == Path.home() / ".cache" / "lightning_advsel"


def write_batches(root: Path, per_batch: int = 8, test: int = 10) -> dict[str, np.ndarray]:
    """A tiny ``cifar-10-batches-py`` in the original pickle format; returns the test images (N, 3072)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = {}
    for name, n in [*[(f"data_batch_{i}", per_batch) for i in range(1, 6)], ("test_batch", test)]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, f)
        out[name] = (data, labels)
    return out


def test_python_batches_are_read_without_a_cache(tmp_path):
    written = write_batches(tmp_path / "data")
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "data"), val_size=8, batch_size=4,
                           cache_dir=str(tmp_path / "cache"))
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (32, 8, 10)
    assert dm.loaded_from_cache is False and not (tmp_path / "cache").exists()
    data, labels = written["test_batch"]
    x, y = dm.test_set[3]
    assert torch.equal(x, torch.from_numpy(data[3]).view(3, 32, 32).float() / 255) and int(y) == labels[3]
    (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match=r"CIFAR10 was not found.*missing .*data_batch_4"):
        CIFAR10DataModule(data_dir=str(tmp_path / "data"), val_size=8, batch_size=4).setup()


# ---------------------------------------------------------------------------------------------- augmentation


def test_random_crop_flip_is_a_crop_of_the_padded_image_possibly_mirrored():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = random_crop_flip(x, torch.Generator().manual_seed(0), padding=4)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):  # a test may loop: it checks each sample against every window
        windows = [padded[i, :, r:r + 32, c:c + 32] for r in range(9) for c in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows), i
    floats = random_crop_flip(x.float() / 255, torch.Generator().manual_seed(0), padding=4)
    assert floats.dtype == torch.float32 and 0 <= float(floats.min()) and float(floats.max()) <= 1
    assert torch.equal(floats, out.float() / 255)  # the same draws whatever the dtype


def test_random_crop_flip_flips_half_the_images_and_moves_the_window():
    x = torch.arange(32.0).expand(4000, 1, 32, 32).contiguous()  # each row reads 0..31 left to right
    out = random_crop_flip(x, torch.Generator().manual_seed(1), padding=0)
    flipped = out[:, 0, 0, 0] == 31
    assert torch.equal(out[~flipped], x[~flipped]) and torch.equal(out[flipped], x[flipped].flip(-1))
    assert 0.46 < flipped.float().mean() < 0.54
    shifted = random_crop_flip(torch.ones(2000, 1, 32, 32), torch.Generator().manual_seed(2), padding=4)
    # A window at offset 4 on both axes (1 in 81) is the only one with no padding in it.
    uncropped = (shifted == 1).flatten(1).all(1).float().mean()
    assert 0.003 < uncropped < 0.03


def test_augmentation_is_a_function_of_the_seed_epoch_batch_and_rank():
    x = torch.rand(16, 3, 32, 32)
    same = [random_crop_flip(x, augment_generator(0, 1, 2, 0)) for _ in range(2)]
    assert torch.equal(*same)
    for other in (augment_generator(1, 1, 2, 0), augment_generator(0, 2, 2, 0), augment_generator(0, 1, 3, 0),
                  augment_generator(0, 1, 2, 1)):
        assert not torch.equal(random_crop_flip(x, other), same[0])
    state = torch.get_rng_state()
    random_crop_flip(x, augment_generator(0, 0, 0))
    assert torch.equal(torch.get_rng_state(), state)  # the global random state is untouched
    with pytest.raises(ValueError, match=r"`padding` must be an integer >= 0, got -1"):
        random_crop_flip(x, augment_generator(0, 0, 0), padding=-1)
    with pytest.raises(ValueError, match=r"`x` must be a batch of images.*\(3, 32, 32\)"):
        random_crop_flip(x[0], augment_generator(0, 0, 0))


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.float32 and float(x.min()) >= 0 and float(x.max()) <= 1  # never uint8
        return self.fc(x.flatten(1))


def fit_fake_cifar(tmp_path: Path, data_dir: Path, ckpt_path: str | None = None, augment: bool = True):
    L.seed_everything(0)
    module = AdversarialSelectionModule(_Linear(), recipe="standard", p_up=1.0, eval_attack=None,
                                        optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    dm = CIFAR10DataModule(data_dir=str(data_dir), val_size=8, batch_size=8, augment=augment)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=2, logger=False, callbacks=[ckpt],
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                        limit_val_batches=0)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module.model.fc.weight.detach().clone()


def test_training_from_uint8_batches_resumes_mid_epoch_to_the_same_weights(tmp_path):
    data = tmp_path / "data"
    write_batches(data)
    straight = fit_fake_cifar(tmp_path / "a", data)  # 4 batches per epoch: step 6 is the 2nd batch of epoch 1
    resumed = fit_fake_cifar(tmp_path / "b", data, ckpt_path=str(tmp_path / "a" / "ckpt" / "step=6.ckpt"))
    assert torch.equal(straight, resumed)
    assert not torch.equal(straight, fit_fake_cifar(tmp_path / "c", data, augment=False))


def test_the_batch_hook_scales_evaluation_batches_and_leaves_float_batches_alone(tmp_path):
    write_batches(tmp_path / "data")
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "data"), val_size=8, batch_size=4)
    dm.setup()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    index = torch.arange(4)
    out = dm.on_after_batch_transfer((x, torch.zeros(4, dtype=torch.long), index), 0)
    assert isinstance(out, tuple) and out[2] is index  # extra fields pass through
    assert torch.equal(out[0], x.float() / 255)  # no trainer, no training: scaled, not augmented
    floats = [x.float() / 255, torch.zeros(4, dtype=torch.long)]
    assert dm.on_after_batch_transfer(floats, 0) is floats


def test_a_training_batch_outside_a_trainer_is_the_one_the_training_step_at_that_position_receives(tmp_path):
    from types import SimpleNamespace

    write_batches(tmp_path / "data")
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "data"), val_size=8, batch_size=4, shuffle_seed=3)
    dm.setup()
    x, y = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.zeros(4, dtype=torch.long)
    out = dm.training_batch((x, y), epoch=1, position=2, rank=1)
    assert torch.equal(out[0], random_crop_flip(x, augment_generator(3, 1, 2, 1), padding=4).float() / 255)
    assert not torch.equal(out[0], dm.training_batch((x, y), epoch=1, position=3, rank=1)[0])
    # The hook during training: the same batch at the same (epoch, position, rank).
    progress = SimpleNamespace(current=SimpleNamespace(ready=2))
    dm.trainer = SimpleNamespace(training=True, current_epoch=1, global_rank=1,
                                 fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))
    assert torch.equal(dm.on_after_batch_transfer((x, y), 0)[0], out[0])
    plain = CIFAR10DataModule(data_dir=str(tmp_path / "data"), val_size=8, batch_size=4, augment=False)
    assert torch.equal(plain.training_batch((x, y), epoch=1, position=2)[0], x.float() / 255)


def test_cache_benchmark_times_a_decoding_setup_then_a_cached_one(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from cifar10_cache_time import main

    # 300 training images: the default batch of 256 fits.
    write_archive(tmp_path / "data" / "cifar10-jpeg.tar.gz", fake_jpeg_files({"train": 30, "test": 1}))
    rows = main(["--data-dir", str(tmp_path / "data"), "--val-size", "5"])
    assert [r["from_cache"] for r in rows] == [False, True]
    assert (rows[0]["train"], rows[0]["val"], rows[0]["test"]) == (295, 5, 10)
    assert "| 2 | True |" in capsys.readouterr().out


@pytest.mark.parametrize("download", [False, True])
def test_missing_cifar10_error_lists_exactly_the_layouts_the_module_reads(tmp_path, monkeypatch, download):
    from urllib.error import URLError

    from torchvision.datasets import CIFAR10

    def offline(self):
        raise URLError("Name or service not known")

    monkeypatch.setattr(CIFAR10, "download", offline)  # a machine without network
    data = tmp_path / "data"
    data.mkdir()
    cli_args = [*config_args("cifar10/base.yaml", "recipes/ds.yaml"), "--data.init_args.data_dir", str(data),
                "--data.init_args.download", str(download).lower(), "--trainer.accelerator", "cpu",
                "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]
    with pytest.raises(FileNotFoundError) as info:
        build_cli(["fit", *cli_args])
    message = str(info.value)
    for place in (data / "cifar-10-batches-py", data / "cifar10-jpeg.tar.gz",
                  data / "cifar10-jpeg" / "cifar10-jpeg.tar.gz", "train/<class>/*.jpg", "test/<class>/*.jpg",
                  data / "cifar10-jpeg"):
        assert str(place) in message
    assert "CIFAR10/raw" not in message  # torchvision's MNIST layout, never read for CIFAR-10
    assert ("download failed" if download else "download: true") in message
