"""LightningDataModules yielding ``(x, y)`` with ``x`` in [0, 1], shape ``(B, C, H, W)``.

* :class:`DigitsDataModule`: scikit-learn's bundled 8x8 digits, offline, the default main job.
* :class:`MNISTDataModule`, :class:`FashionMNISTDataModule`, :class:`CIFAR10DataModule`: torchvision data
  sets read from ``data_dir`` in torchvision's layout (``data_dir/MNIST/raw/...``); downloading is off
  unless ``download=True``. CIFAR-10 also reads the JPEG copy (archive or extracted folders) through a decode
  cache, and augments training batches on their device (``on_after_batch_transfer``).
* :class:`ImageFolderDataModule`: a user's ``train/<class>/*`` and ``test/<class>/*`` folders (optionally
  ``val/``), decoded once into the same cache and augmented on the device as CIFAR-10.

Every module splits a validation set off the training data with a fixed seed, so the split does not
depend on the global seed of a run.

The training order is a pure function of ``(shuffle_seed, epoch)`` (:class:`ResumableSampler`), split
between DDP ranks like ``DistributedSampler``. The data module saves how many batches of the current epoch
were consumed (``state_dict``), so a run resumed from a mid-epoch checkpoint skips exactly those batches and
sees the same remaining batches, in the same order, as an uninterrupted run.

For the stability baseline (:mod:`lightning_advsel.stability`), every module takes ``return_index`` (training
batches become ``(x, y, index)``, ``index`` each row's position in the training split) and ``subset_file``,
``subset_fraction``, ``subset_keep`` (train on the most stable or unstable fraction of a profiling run's
samples). Validation and test sets are never restricted.

``predict`` reads the test set (``predict_dataloader``), in order, as ``(x, y)`` batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset
from typing_extensions import override

from lightning_advsel import stability
from lightning_advsel.augment import augment_generator, random_crop_flip
from lightning_advsel.batch import unpack
from lightning_advsel.checks import check_bool, check_choice, check_fraction, check_int, check_number, check_path
from lightning_advsel.stability import Keep

NUM_CLASSES = 10
Channels = Literal[1, 3]  # an image folder read as grey or RGB


def _split(n: int, sizes: tuple[int, ...], seed: int) -> list[Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(torch.split(perm, list(sizes)))


class ResumableSampler(DistributedSampler):
    """A ``DistributedSampler`` whose order depends on ``(seed, epoch)`` only and that can skip a prefix.

    Being a ``DistributedSampler``, Lightning keeps it under DDP instead of replacing it, and calls
    ``set_epoch`` on it every epoch. ``skip(epoch, n)`` drops the first ``n`` indices of that epoch once
    (the samples consumed before a checkpoint); the reported length stays the full epoch, which is what
    Lightning's progress counters expect when it resumes mid-epoch.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self._skip_epoch = -1
        self._skip_samples = 0

    def skip(self, epoch: int, samples: int) -> None:
        self._skip_epoch, self._skip_samples = epoch, samples

    def __iter__(self):  # noqa: ANN204 - an iterator of indices, as DistributedSampler's
        indices = list(super().__iter__())
        if self.epoch == self._skip_epoch:
            indices = indices[self._skip_samples:]
            self._skip_epoch = -1
        yield from indices


class IndexedDataset(Dataset):
    """The rows of ``dataset`` with their position appended: item ``i`` is ``(*dataset[i], i)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple:
        return (*self.dataset[i], i)


class _BaseDataModule(L.LightningDataModule):
    """Shared setup and loaders. Subclasses return their three sets from :meth:`_load_sets`.

    ``train_set`` is always the whole training split; the loader reads :meth:`training_view` of it.
    """

    def __init__(self, batch_size: int, num_workers: int, split_seed: int, shuffle_seed: int = 0,
                 return_index: bool = False, subset_file: str | None = None, subset_fraction: float = 0.5,
                 subset_keep: Keep = "stable") -> None:
        super().__init__()
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.num_workers = check_int("num_workers", num_workers, 0)
        self.split_seed = check_int("split_seed", split_seed, 0)
        self.shuffle_seed = check_int("shuffle_seed", shuffle_seed, 0)
        if not isinstance(return_index, bool):
            raise ValueError(f"`return_index` must be true or false, got {return_index!r}")
        self.return_index = return_index
        self.subset_file = check_path("subset_file", subset_file, "the path of a stability profile", optional=True)
        self.subset_fraction = check_fraction("subset_fraction", subset_fraction)
        self.subset_keep = check_choice("subset_keep", subset_keep, stability.KEEP)
        self.subset_profile: stability.Profile | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._resume: dict[str, int] = {}
        self._view: tuple[Dataset, Dataset] | None = None

    @property
    def index_size(self) -> int:
        """Samples in the whole training split: ``return_index`` yields indices in ``[0, index_size)``."""
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before `index_size` is read")
        return len(self.train_set)

    def training_view(self) -> Dataset:
        """The training set the loader reads: ``train_set`` restricted to the ``subset_file`` subset (if any),
        its rows carrying their index into ``train_set`` when ``return_index`` is set.

        Raises:
            FileNotFoundError, ValueError: for a ``subset_file`` that is missing, malformed, or made for another
                data set size or ``split_seed`` (see :func:`lightning_advsel.stability.check_profile`).
        """
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are requested")
        if self._view is None or self._view[0] is not self.train_set:
            view = IndexedDataset(self.train_set) if self.return_index else self.train_set
            if self.subset_file is not None:
                profile = stability.read_profile(self.subset_file)
                stability.check_profile(profile, self.subset_file, len(self.train_set), self.split_seed)
                kept = stability.subset_indices(profile.counts, self.subset_fraction, self.subset_keep)
                view = Subset(view, kept.tolist())
                self.subset_profile = profile
                rank_zero_info(
                    f"{type(self).__name__}: training on the {len(kept)} most {self.subset_keep} of "
                    f"{len(self.train_set)} samples ({self.subset_fraction:g}) by {self.subset_file!r} "
                    f"({profile.epochs} profiled epochs)"
                )
            self._view = (self.train_set, view)
        return self._view[1]

    def _loader(self, dataset: Dataset | None, sampler: ResumableSampler | None = None) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are requested")
        # Page-locked batches copy to a GPU asynchronously; for a CPU run pinning only costs memory. Workers stay
        # alive between epochs (no fork and dataset copy per epoch).
        trainer = self.trainer
        pin = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          pin_memory=pin, persistent_workers=self.num_workers > 0)

    def _load_sets(self) -> tuple[Dataset, Dataset, Dataset]:
        """The whole training split, the validation set and the test set, read from the data source."""
        raise NotImplementedError

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.train_set, self.val_set, self.test_set = self._load_sets()
        self._check_sets()

    def _check_sets(self) -> None:
        """Called at the end of ``setup``: a training set that is empty or smaller than one batch is refused."""
        n = len(self.train_set)
        if n == 0:
            raise ValueError(f"{type(self).__name__} has an empty training set; check the data set and the split sizes")
        n = len(self.training_view())
        if self.batch_size > n:
            raise ValueError(f"`batch_size` must be at most the {n} training samples, got {self.batch_size}")

    def train_dataloader(self) -> DataLoader:
        train_set = self.training_view()
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableSampler(train_set, world, rank, self.shuffle_seed)
        if self._resume:
            # Every rank consumed the same number of batches; skip this rank's share of them.
            sampler.skip(self._resume["epoch"], self._resume["batches"] * self.batch_size)
            self._resume = {}
        return self._loader(train_set, sampler)

    def state_dict(self) -> dict[str, int]:
        """Where training is inside the current epoch: ``{"epoch", "batches"}`` consumed so far."""
        trainer = self.trainer
        if trainer is None:
            return {}
        # `processed` includes the batch whose end triggered a mid-epoch save; Lightning's restore counts that
        # batch as completed and continues with the next one, so both skip the same number of batches.
        return {"epoch": int(trainer.current_epoch),
                "batches": int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if "epoch" in state_dict:
            self._resume = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict.get("batches", 0))}

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        """The test set, in order, for ``trainer.predict`` and ``lightning-advsel predict``."""
        return self._loader(self.test_set)


class DigitsDataModule(_BaseDataModule):
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), scaled to [0, 1]; no download.

    Args:
        batch_size: clean samples per training batch (b' in the DS paper).
        val_size: images held out for validation.
        test_size: images held out for testing.
        num_workers: data-loading worker processes.
        split_seed: seed of the fixed train/val/test split.
        shuffle_seed: seed of the training order (a function of this seed and the epoch only).
        return_index: training batches are ``(x, y, index)``, ``index`` (a LongTensor) each row's position in
            the training split; needed by :class:`~lightning_advsel.callbacks.StabilityProfile`.
        subset_file: a stability profile (JSON, written by ``StabilityProfile``); training then uses only the
            ``subset_fraction`` of its samples chosen by ``subset_keep``. Read at ``setup``; it must have been
            made for this data set size and ``split_seed``. Validation and test sets are unchanged.
        subset_fraction: share of the training split kept, in (0, 1] (rounded half up).
        subset_keep: ``"stable"`` (fewest epochs misclassified, the baseline) or ``"unstable"`` (most); ties go
            to the lower index.

    Raises:
        ValueError: for a non-positive ``batch_size``, split sizes that leave no training data, or a bad
            ``return_index``, ``subset_file``, ``subset_fraction`` or ``subset_keep``; from ``setup``, for a
            ``subset_file`` made for another data set size or ``split_seed`` (``FileNotFoundError`` if missing).
    """

    num_classes = NUM_CLASSES
    total = 1797

    def __init__(self, batch_size: int = 64, val_size: int = 270, test_size: int = 270,
                 num_workers: int = 0, split_seed: int = 0, shuffle_seed: int = 0,
                 return_index: bool = False, subset_file: str | None = None,
                 subset_fraction: float = 0.5, subset_keep: Keep = "stable") -> None:
        super().__init__(batch_size, num_workers, split_seed, shuffle_seed,
                         return_index, subset_file, subset_fraction, subset_keep)
        check_int("val_size", val_size, 1)
        check_int("test_size", test_size, 1)
        if val_size + test_size >= self.total:
            raise ValueError(
                f"`val_size` + `test_size` must leave training data out of {self.total} digits, "
                f"got {val_size} + {test_size}"
            )
        if batch_size > self.total - val_size - test_size:
            raise ValueError(
                f"`batch_size` must be at most the {self.total - val_size - test_size} training digits, "
                f"got {batch_size}"
            )
        self.val_size = val_size
        self.test_size = test_size

    @override
    def _load_sets(self) -> tuple[Dataset, Dataset, Dataset]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        n_train = len(y) - self.val_size - self.test_size
        splits = _split(len(y), (n_train, self.val_size, self.test_size), self.split_seed)
        return tuple(TensorDataset(x[rows], y[rows]) for rows in splits)


class _TorchvisionDataModule(_BaseDataModule):
    """A torchvision data set (or a folder of images) with a seeded validation split off its training part."""

    dataset_name = ""
    num_classes = NUM_CLASSES
    val_size_optional = False  # True where a validation folder may stand in for the split (``val_size=None``)

    def __init__(self, data_dir: str, download: bool, batch_size: int, val_size: int,
                 num_workers: int, split_seed: int, shuffle_seed: int = 0,
                 return_index: bool = False, subset_file: str | None = None,
                 subset_fraction: float = 0.5, subset_keep: Keep = "stable", train_size: int | None = None) -> None:
        super().__init__(batch_size, num_workers, split_seed, shuffle_seed,
                         return_index, subset_file, subset_fraction, subset_keep)
        check_int("val_size", val_size, 1, optional=self.val_size_optional)
        self.train_size = check_int("train_size", train_size, 1, optional=True)
        self.data_dir = check_path("data_dir", data_dir, "a folder path")
        self.download = download
        self.val_size = val_size

    def _train_val_split(self, train: Dataset, val: Dataset | None = None,
                         held_out: int | None = None) -> tuple[Subset, Subset]:
        """The training and validation subsets of the data set's training part ``train``.

        The validation images are ``held_out`` (by default ``val_size``) drawn with ``split_seed``; the training
        images are the rest, or the first ``train_size`` of the rest in that seeded order (a fixed random subset
        for a smaller budget). ``val``, when given, is the same images served differently (without
        augmentation); the validation subset is taken from it.
        """
        held_out = self.val_size if held_out is None else held_out
        n = len(train)
        if n == 0:
            raise ValueError(f"{type(self).__name__} found an empty data set under data_dir={self.data_dir!r}; "
                             f"expected training images there")
        if held_out >= n:
            raise ValueError(
                f"`val_size` must be below the {n} training images of {self.dataset_name}, got {held_out}"
            )
        if self.train_size is not None and self.train_size > n - held_out:
            raise ValueError(
                f"`train_size` must be at most the {n - held_out} training images of {self.dataset_name} left "
                f"after `val_size`={held_out}, got {self.train_size}"
            )
        train_idx, val_idx = _split(n, (n - held_out, held_out), self.split_seed)
        if self.train_size is not None:
            train_idx = train_idx[: self.train_size]
        return Subset(train, train_idx.tolist()), Subset(train if val is None else val, val_idx.tolist())

    def _dataset_cls(self) -> type:
        raise NotImplementedError

    def _train_transform(self):  # noqa: ANN202 - torchvision transform
        from torchvision import transforms

        return transforms.ToTensor()

    def _layouts(self) -> str:
        """The copies of the data set this module reads under ``data_dir``, for error messages."""
        return f"torchvision's {Path(self.data_dir) / self.dataset_name}/raw/... or the extracted archive"

    def _open(self, train: bool, transform) -> Dataset:  # noqa: ANN001
        try:
            return self._dataset_cls()(self.data_dir, train=train, transform=transform, download=self.download)
        except (RuntimeError, OSError) as err:  # torchvision's "not found or corrupted", or a failed download
            fix = ("the download failed: check the network, or place a copy there and set `download: false`"
                   if self.download else
                   "set `download: true` (--data.init_args.download true) to fetch it, or point `data_dir` at a "
                   "folder that holds it")
            raise FileNotFoundError(
                f"{self.dataset_name} was not found under data_dir={self.data_dir!r} (looked for "
                f"{self._layouts()}); {fix}. ({err})"
            ) from err

    def prepare_data(self) -> None:
        if self.download:
            from torchvision import transforms

            self._open(True, transforms.ToTensor())
            self._open(False, transforms.ToTensor())

    @override
    def _load_sets(self) -> tuple[Dataset, Dataset, Dataset]:
        from torchvision import transforms

        plain = transforms.ToTensor()
        train, val = self._train_val_split(self._open(True, self._train_transform()), self._open(True, plain))
        return train, val, self._open(False, plain)


_IDX_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_idx(path: Path) -> Tensor:
    """Read an IDX file (the MNIST format), uncompressed or as ``.gz`` next to where it would be."""
    import gzip

    import numpy as np

    if path.exists():
        raw = path.read_bytes()
    else:
        raw = gzip.decompress(path.with_name(path.name + ".gz").read_bytes())
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return torch.from_numpy(data.copy()).view(*shape)


class MNISTDataModule(_TorchvisionDataModule):
    """MNIST (28x28, 1 channel) from ``data_dir`` in torchvision's layout, raw IDX files plain or gzipped.

    Args:
        data_dir: folder holding ``MNIST/raw`` (``train-images-idx3-ubyte[.gz]`` and the three others).
        download: fetch the data set with torchvision if it is missing (off by default).
        batch_size: clean samples per training batch.
        val_size: training images held out for validation.
        num_workers: data-loading worker processes.
        split_seed: seed of the fixed train/val split.
        shuffle_seed: seed of the training order (a function of this seed and the epoch only).
        return_index: training batches are ``(x, y, index)`` (as :class:`DigitsDataModule`).
        subset_file: train on a subset chosen from this stability profile (as :class:`DigitsDataModule`).
        subset_fraction: share of the training split kept with ``subset_file``, in (0, 1].
        subset_keep: ``"stable"`` or ``"unstable"``: which end of the profile's ranking is kept.
        train_size: train on this many images of the training split only (a fixed subset drawn with
            ``split_seed``, the same for every run); ``None``: all of them.

    Raises:
        ValueError: for bad sizes or subset arguments (as :class:`DigitsDataModule`). ``FileNotFoundError``
            (from ``setup``) if the data or the ``subset_file`` is missing.
    """

    dataset_name = "MNIST"

    def __init__(self, data_dir: str = "data", download: bool = False, batch_size: int = 128, val_size: int = 5000,
                 num_workers: int = 0, split_seed: int = 0, shuffle_seed: int = 0,
                 return_index: bool = False, subset_file: str | None = None,
                 subset_fraction: float = 0.5, subset_keep: Keep = "stable", train_size: int | None = None) -> None:
        super().__init__(data_dir, download, batch_size, val_size, num_workers, split_seed, shuffle_seed,
                         return_index, subset_file, subset_fraction, subset_keep, train_size)

    def _dataset_cls(self) -> type:
        from torchvision.datasets import MNIST

        return MNIST

    def _raw(self, train: bool) -> TensorDataset:
        raw = Path(self.data_dir) / self.dataset_name / "raw"
        images, labels = (raw / name for name in _IDX_FILES[train])
        missing = [str(p) for p in (images, labels) if not p.exists() and not p.with_name(p.name + ".gz").exists()]
        if missing:
            raise FileNotFoundError(
                f"{self.dataset_name} was not found under data_dir={self.data_dir!r}: missing {missing} (or .gz). "
                f"Set `download: true` (--data.init_args.download true) to fetch it with torchvision, or point "
                f"`data_dir` at a folder that holds {self.dataset_name}/raw."
            )
        x = _read_idx(images).unsqueeze(1).float() / 255.0
        return TensorDataset(x, _read_idx(labels).long())

    def prepare_data(self) -> None:
        if self.download:
            for train in (True, False):
                self._dataset_cls()(self.data_dir, train=train, download=True)

    @override
    def _load_sets(self) -> tuple[Dataset, Dataset, Dataset]:
        return (*self._train_val_split(self._raw(True)), self._raw(False))


class FashionMNISTDataModule(MNISTDataModule):
    """FashionMNIST (28x28, 1 channel) from ``data_dir`` (``FashionMNIST/raw``); arguments as MNIST's."""

    dataset_name = "FashionMNIST"

    def _dataset_cls(self) -> type:
        from torchvision.datasets import FashionMNIST

        return FashionMNIST


TEST_ORDER_SEED = 0  # the fixed order of an evaluation split that was stored class by class


class _ScaledImages(Dataset):
    """uint8 images ``(N, C, H, W)`` and labels, served one at a time as float images in [0, 1]."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i].float().div_(255), self.labels[i]


def _mixed(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(x, y)`` in a fixed seeded order if stored class by class (labels non-decreasing), else unchanged.

    A split stored by class (JPEG folders) would make its first N images one class; the fixed order lets a subset
    (``limit_test_batches``) sample every class."""
    if y.numel() > 1 and bool((y[1:] >= y[:-1]).all()):
        order = torch.randperm(y.numel(), generator=torch.Generator().manual_seed(TEST_ORDER_SEED))
        return x[order], y[order]
    return x, y


class _DecodedImagesDataModule(_TorchvisionDataModule):
    """uint8 images decoded once into a cache and held in memory; training batches augmented on their device.

    Subclasses return the decoded tensors from :meth:`_decoded`. The training loader yields uint8 images;
    :meth:`on_after_batch_transfer` augments them as whole batches on the batch's device (random crop with
    ``padding`` pixels of zero padding, horizontal flip) and scales them to float in [0, 1]. The augmentation of a
    batch is seeded by ``(shuffle_seed, epoch, batch index, rank)``, so a resumed run sees the same augmented
    batches as an uninterrupted one. Validation and test items are already float in [0, 1] (a callback that reads
    ``val_set[i]`` gets what the model takes); a split stored class by class is served in a fixed seeded order.
    """

    def __init__(self, data_dir: str, download: bool, batch_size: int, val_size: int | None, augment: bool,
                 padding: int, num_workers: int, split_seed: int, shuffle_seed: int, cache_dir: str | None,
                 return_index: bool, subset_file: str | None, subset_fraction: float, subset_keep: Keep,
                 train_size: int | None) -> None:
        super().__init__(data_dir, download, batch_size, val_size, num_workers, split_seed, shuffle_seed,
                         return_index, subset_file, subset_fraction, subset_keep, train_size)
        self.augment = check_bool("augment", augment)
        self.padding = check_int("padding", padding, 0)
        self.cache_dir = check_path("cache_dir", cache_dir, "a folder path", optional=True)
        self.loaded_from_cache: bool | None = None

    def _decoded(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None, tuple[Tensor, Tensor]]:
        """The training part, the validation folder's images (``None`` to split them off the training part) and
        the test images, each as uint8 ``(N, C, H, W)`` and int64 labels; sets ``loaded_from_cache``."""
        raise NotImplementedError

    @override
    def _load_sets(self) -> tuple[Dataset, Dataset, Dataset]:
        (train_x, train_y), val, test = self._decoded()
        train = TensorDataset(train_x, train_y)
        if val is None:
            return (*self._train_val_split(train, _ScaledImages(train_x, train_y)), _ScaledImages(*_mixed(*test)))
        train, _ = self._train_val_split(train, held_out=0)
        return train, _ScaledImages(*_mixed(*val)), _ScaledImages(*_mixed(*test))

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Augment (training only) and scale uint8 batches to float in [0, 1], on the device the batch is on."""
        if unpack(batch)[0].dtype != torch.uint8:
            return batch
        trainer = self.trainer
        if trainer is not None and trainer.training:
            # The index of this batch in the epoch: Lightning counts a batch as ready only after this hook,
            # and restores the count on resume, so the seed does not depend on an interruption.
            position = trainer.fit_loop.epoch_loop.batch_progress.current.ready
            return self.training_batch(batch, trainer.current_epoch, position, trainer.global_rank)
        return self._scaled(batch, None)

    def training_batch(self, batch: Any, epoch: int, position: int, rank: int = 0) -> Any:
        """A uint8 training batch as the training step at ``position`` of ``epoch`` on ``rank`` receives it:
        augmented (with ``augment``) and scaled to float in [0, 1]. For a script that reads the training loader
        without a Trainer."""
        generator = augment_generator(self.shuffle_seed, epoch, position, rank) if self.augment else None
        return self._scaled(batch, generator)

    def _scaled(self, batch: Any, generator: torch.Generator | None) -> Any:
        """``batch`` with its uint8 images cropped and flipped by ``generator`` (unless ``None``), as floats."""
        x, y, extra = unpack(batch)
        if generator is not None:
            x = random_crop_flip(x, generator, padding=self.padding)
        out = [x.float().div_(255), y, *extra]
        return tuple(out) if isinstance(batch, tuple) else out


class CIFAR10DataModule(_DecodedImagesDataModule):
    """CIFAR-10 (32x32, 3 channels) from ``data_dir``: python batches, the JPEG archive or its extracted folders.

    ``data_dir`` may hold the original ``cifar-10-batches-py``, the JPEG copy ``cifar10-jpeg.tar.gz`` (at
    ``data_dir`` or ``data_dir/cifar10-jpeg/``) or its extracted ``train/<class>/*.jpg`` and
    ``test/<class>/*.jpg`` folders (:mod:`lightning_advsel.cifar10_files`). JPEGs are decoded once into a uint8
    tensor file in ``cache_dir``; nothing is written into ``data_dir``. ``loaded_from_cache`` says whether the
    last ``setup`` read that file instead of decoding.

    The training loader yields uint8 images; :meth:`on_after_batch_transfer` augments them as whole batches on
    the batch's device (random crop with 4 pixels of zero padding, horizontal flip) and scales them to float in
    [0, 1]. The augmentation of a batch is seeded by ``(shuffle_seed, epoch, batch index, rank)``, so a resumed
    run sees the same augmented batches as an uninterrupted one. Validation and test items are already float
    in [0, 1] (a callback that reads ``val_set[i]`` gets what the model takes).

    Args:
        data_dir: folder holding one of the copies above; only read.
        download: fetch the python batches with torchvision into ``data_dir`` if they are missing (off by default).
        batch_size: clean samples per training batch.
        val_size: training images held out for validation.
        augment: random 32x32 crop with 4 pixels of padding and horizontal flip on training batches.
        num_workers: data-loading worker processes (the images are tensors in memory: 0 is enough).
        split_seed: seed of the fixed train/val split.
        shuffle_seed: seed of the training order and of the augmentation (functions of this seed and the epoch).
        cache_dir: writable folder for the decoded JPEGs; ``None`` means ``$XDG_CACHE_HOME/lightning_advsel``
            or ``~/.cache/lightning_advsel``.
        return_index: training batches are ``(x, y, index)`` (as :class:`DigitsDataModule`).
        subset_file: train on a subset chosen from this stability profile (as :class:`DigitsDataModule`).
        subset_fraction: share of the training split kept with ``subset_file``, in (0, 1].
        subset_keep: ``"stable"`` or ``"unstable"``: which end of the profile's ranking is kept.
        train_size: train on this many images of the training split only (a fixed subset drawn with
            ``split_seed``, the same for every run); ``None``: all of them.

    Raises:
        ValueError: for bad sizes, subset arguments (as :class:`DigitsDataModule`) or a ``cache_dir`` that is not
            a path; from ``setup``, for a truncated or foreign archive (naming the file). ``FileNotFoundError``
            (from ``setup``) if no copy or the ``subset_file`` is found; ``PermissionError`` (from ``setup``) if
            ``cache_dir`` is not writable.
    """

    dataset_name = "CIFAR10"

    def __init__(self, data_dir: str = "data", download: bool = False, batch_size: int = 256, val_size: int = 5000,
                 augment: bool = True, num_workers: int = 0, split_seed: int = 0, shuffle_seed: int = 0,
                 cache_dir: str | None = None, return_index: bool = False, subset_file: str | None = None,
                 subset_fraction: float = 0.5, subset_keep: Keep = "stable", train_size: int | None = None) -> None:
        super().__init__(data_dir, download, batch_size, val_size, augment, 4, num_workers, split_seed, shuffle_seed,
                         cache_dir, return_index, subset_file, subset_fraction, subset_keep, train_size)

    def _dataset_cls(self) -> type:
        from torchvision.datasets import CIFAR10

        return CIFAR10

    @override
    def _layouts(self) -> str:
        from lightning_advsel import cifar10_files

        return cifar10_files.describe_sources(self.data_dir)

    def _files(self, prepare: bool = False):  # noqa: ANN202 - cifar10_files.Cifar10Tensors, or None
        from lightning_advsel import cifar10_files

        try:
            if prepare:
                return cifar10_files.prepare_cifar10(self.data_dir, self.cache_dir)
            return cifar10_files.load_cifar10(self.data_dir, self.cache_dir)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"{self.dataset_name} was not found under data_dir={self.data_dir!r}: {err}. Set `download: true` "
                f"(--data.init_args.download true) to fetch the python batches, or point `data_dir` at a folder "
                f"that holds a copy."
            ) from err

    @override
    def prepare_data(self) -> None:
        # Once per node before any rank's setup: download if asked, and decode JPEGs into the cache, so the
        # ranks' setup only loads it.
        super().prepare_data()
        self._files(prepare=True)

    @override
    def _decoded(self) -> tuple[tuple[Tensor, Tensor], None, tuple[Tensor, Tensor]]:
        data = self._files()
        self.loaded_from_cache = data.from_cache
        return (data.train_x, data.train_y), None, (data.test_x, data.test_y)


class ImageFolderDataModule(_DecodedImagesDataModule):
    """A user's image folders: ``data_dir/train/<class>/*`` and ``data_dir/test/<class>/*``, optionally
    ``data_dir/val/<class>/*`` (:mod:`lightning_advsel.image_folder`).

    The classes are ``train/``'s subfolders, sorted: ``classes`` and ``num_classes`` read them (before
    ``setup`` too), and a ``test/`` or ``val/`` class must be one of them. Images are decoded once into the uint8
    cache that CIFAR-10 uses, keyed on the files (their paths, sizes and modification times) and the settings,
    and held in memory: that suits data sets whose uint8 pixels fit in memory a few times over (each DDP rank
    holds a copy); above ``max_memory_gib`` ``setup`` refuses before decoding. Without ``image_size`` all images
    must share one size; with it, images of another size are scaled to cover it (aspect ratio kept) and
    center-cropped. Training batches are augmented on their device as :class:`CIFAR10DataModule`'s (random crop
    with ``padding`` pixels of zero padding, horizontal flip, seeded by ``(shuffle_seed, epoch, batch index,
    rank)``). ``setup`` reports the training split's per-channel ``mean`` and ``std`` (pixels in [0, 1]): the
    values for the network's normalization.

    Args:
        data_dir: folder holding ``train/``, ``test/`` and optionally ``val/``; only read.
        batch_size: clean samples per training batch.
        val_size: training images held out for validation when there is no ``val/`` folder (then required);
            ``None`` with a ``val/`` folder, whose images are the validation set.
        image_size: ``[height, width]`` (or one number for square images) in pixels that every image is brought
            to; ``None``: the images' own size, which all must share.
        channels: 3 (RGB; grey images repeated) or 1 (grey; colour images converted).
        augment: random crop with ``padding`` and horizontal flip on training batches.
        padding: pixels of zero padding per side of the random crop (4 for 32x32 images).
        num_workers: data-loading worker processes (the images are tensors in memory: 0 is enough).
        split_seed: seed of the fixed train/val split and of ``train_size``'s subset.
        shuffle_seed: seed of the training order and of the augmentation (functions of this seed and the epoch).
        cache_dir: writable folder for the decoded images; ``None`` means ``$XDG_CACHE_HOME/lightning_advsel``
            or ``~/.cache/lightning_advsel``.
        max_memory_gib: the most GiB the decoded uint8 images may take (``images x channels x height x width``
            bytes); a larger data set is refused before decoding.
        return_index: training batches are ``(x, y, index)`` (as :class:`DigitsDataModule`).
        subset_file: train on a subset chosen from this stability profile (as :class:`DigitsDataModule`).
        subset_fraction: share of the training split kept with ``subset_file``, in (0, 1].
        subset_keep: ``"stable"`` or ``"unstable"``: which end of the profile's ranking is kept.
        train_size: train on this many images of the training split only (a fixed subset drawn with
            ``split_seed``); ``None``: all of them.

    Raises:
        ValueError: for a bad argument, naming it and the value; from ``setup``, for a ``val_size`` beside a
            ``val/`` folder or none without one, an empty class folder, a file that is not an image, images of
            several sizes without ``image_size``, a ``test/`` or ``val/`` class that ``train/`` lacks, or images
            above ``max_memory_gib``, each naming the path. ``FileNotFoundError`` (from ``setup``, and from
            ``num_classes`` before it) if ``train/`` or ``test/`` is missing; ``PermissionError`` (from
            ``setup``) if ``cache_dir`` is not writable.
    """

    dataset_name = "the image folders"
    val_size_optional = True

    def __init__(self, data_dir: str = "data", batch_size: int = 128, val_size: int | None = None,
                 image_size: int | tuple[int, int] | None = None, channels: Channels = 3, augment: bool = True,
                 padding: int = 4, num_workers: int = 0, split_seed: int = 0, shuffle_seed: int = 0,
                 cache_dir: str | None = None, max_memory_gib: float = 4.0, return_index: bool = False,
                 subset_file: str | None = None, subset_fraction: float = 0.5, subset_keep: Keep = "stable",
                 train_size: int | None = None) -> None:
        super().__init__(data_dir, False, batch_size, val_size, augment, padding, num_workers, split_seed,
                         shuffle_seed, cache_dir, return_index, subset_file, subset_fraction, subset_keep, train_size)
        self.image_size = _image_size(image_size)
        if isinstance(channels, bool) or channels not in get_args(Channels):  # True == 1: refused by name
            raise ValueError(f"`channels` must be one of {get_args(Channels)}, got {channels!r}")
        self.channels = channels
        self.max_memory_gib = check_number("max_memory_gib", max_memory_gib, 0, strict=True, unit="GiB")
        self.mean: tuple[float, ...] | None = None
        self.std: tuple[float, ...] | None = None
        self._classes: tuple[str, ...] | None = None

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names in label order: ``train/``'s subfolders, sorted."""
        from lightning_advsel import image_folder

        return self._classes if self._classes is not None else image_folder.class_names(self.data_dir)

    @property
    def num_classes(self) -> int:
        """The number of class folders in ``train/``."""
        return len(self.classes)

    @override
    def _layouts(self) -> str:
        return f"{Path(self.data_dir) / 'train'}/<class>/* and {Path(self.data_dir) / 'test'}/<class>/*"

    def _read(self, prepare: bool = False):  # noqa: ANN202 - image_folder.FolderImages, or None
        from lightning_advsel import image_folder

        return image_folder.load_image_folder(self.data_dir, self.cache_dir, self.image_size, self.channels,
                                              self.max_memory_gib, prepare=prepare)

    @override
    def prepare_data(self) -> None:
        # Once per node before any rank's setup: decode into the cache, so the ranks' setup only loads it.
        self._read(prepare=True)

    @override
    def _decoded(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None, tuple[Tensor, Tensor]]:
        data = self._read()
        has_val = "val" in data.splits
        if has_val == (self.val_size is not None):
            raise ValueError(
                f"`val_size` must be None when {Path(self.data_dir) / 'val'} holds the validation images, got "
                f"{self.val_size}" if has_val else
                f"`val_size` must be stated (images held out of training for validation): there is no "
                f"{Path(self.data_dir) / 'val'} folder, got None")
        self.loaded_from_cache, self._classes = data.from_cache, data.classes
        return data.splits["train"], data.splits.get("val"), data.splits["test"]

    @override
    def _load_sets(self) -> tuple[Dataset, Dataset, Dataset]:
        train, val, test = super()._load_sets()
        images = train.dataset.tensors[0]
        self.mean, self.std = _channel_stats(images, train.indices)
        h, w = images.shape[-2:]
        rank_zero_info(
            f"{type(self).__name__}: {len(train)} training, {len(val)} validation and {len(test)} test images of "
            f"{self.num_classes} classes, {h}x{w}x{images.shape[1]} ({'cache' if self.loaded_from_cache else 'decoded'}"
            f"); the training split's per-channel mean {[round(m, 4) for m in self.mean]} and std "
            f"{[round(v, 4) for v in self.std]} (pixels in [0, 1]) are the network's `mean` and `std`"
        )
        return train, val, test


def _image_size(value: Any) -> tuple[int, int] | None:
    """``image_size`` as ``(height, width)``: one positive integer for both, a pair, or ``None``."""
    if value is None:
        return None
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair)):
        raise ValueError(f"`image_size` must be a positive integer or [height, width] of them, or None, got {value!r}")
    return int(pair[0]), int(pair[1])


def _channel_stats(images: Tensor, rows: list[int], chunk: int = 8192) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of the uint8 images ``images[rows]`` (``(N, C, H, W)``), in pixel
    units ([0, 1]), exact: from each channel's histogram of the 256 values."""
    channels = images.shape[1]
    counts = torch.zeros(channels, 256, dtype=torch.int64)
    index = torch.as_tensor(rows, dtype=torch.long)
    for start in range(0, len(index), chunk):  # a chunk at a time: no copy of the whole data set
        part = images[index[start:start + chunk]].transpose(0, 1).reshape(channels, -1)
        for c in range(channels):
            counts[c] += torch.bincount(part[c], minlength=256)
    values = torch.arange(256, dtype=torch.float64) / 255
    n = counts.sum(dim=1).double()
    mean = (counts * values).sum(dim=1) / n
    std = ((counts * values.square()).sum(dim=1) / n - mean.square()).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())
