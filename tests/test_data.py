"""Data modules: offline digits, torchvision-layout MNIST, and clear errors for missing data."""

from __future__ import annotations

import pytest
import torch
from conftest import SHARED_DATA

from lightning_advsel.data import CIFAR10DataModule, DigitsDataModule, FashionMNISTDataModule, MNISTDataModule


def test_digits_split_is_fixed_disjoint_and_in_pixel_range():
    a, b = DigitsDataModule(), DigitsDataModule()
    a.setup(), b.setup()
    assert len(a.train_set) == 1797 - 540 and len(a.val_set) == 270 and len(a.test_set) == 270
    assert torch.equal(a.val_set.tensors[0], b.val_set.tensors[0])
    x, y = a.train_set.tensors
    assert x.shape[1:] == (1, 8, 8) and x.min() >= 0 and x.max() <= 1 and set(y.tolist()) == set(range(10))
    rows = {tuple(t.flatten().tolist()) for t in a.test_set.tensors[0]}
    # Digits has a few duplicate images, so compare by count rather than demanding an empty intersection.
    assert sum(tuple(t.flatten().tolist()) in rows for t in a.val_set.tensors[0]) < 5
    batch_x, batch_y = next(iter(a.train_dataloader()))
    assert batch_x.shape == (64, 1, 8, 8) and batch_y.dtype == torch.long


def test_digits_split_seed_changes_the_split():
    a, b = DigitsDataModule(split_seed=0), DigitsDataModule(split_seed=1)
    a.setup(), b.setup()
    assert not torch.equal(a.val_set.tensors[1], b.val_set.tensors[1])


def test_shuffle_seed_sets_the_training_order_from_the_constructor_and_keeps_the_split():
    first = {}
    for seed in (0, 0, 1):
        dm = DigitsDataModule(shuffle_seed=seed)
        dm.setup()
        labels = next(iter(dm.train_dataloader()))[1]
        if seed in first:
            assert torch.equal(first[seed][0], labels)  # same seed, same order
        first.setdefault(seed, (labels, dm.val_set.tensors[1]))
    assert not torch.equal(first[0][0], first[1][0])
    assert torch.equal(first[0][1], first[1][1])  # the split does not move with the order
    with pytest.raises(ValueError, match=r"`shuffle_seed`.*-1"):
        MNISTDataModule(shuffle_seed=-1)


@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").exists(), reason="needs ../shared/data/MNIST")
def test_mnist_reads_gzipped_raw_files_from_data_dir():
    dm = MNISTDataModule(data_dir=str(SHARED_DATA), val_size=5000)
    dm.setup()
    assert len(dm.train_set) == 55000 and len(dm.val_set) == 5000 and len(dm.test_set) == 10000
    x, y = dm.test_set[0]
    assert x.shape == (1, 28, 28) and 0 <= x.min() and x.max() <= 1 and 0 <= int(y) <= 9


@pytest.mark.parametrize("cls,name", [(MNISTDataModule, "MNIST"), (FashionMNISTDataModule, "FashionMNIST"),
                                      (CIFAR10DataModule, "CIFAR10")])
def test_missing_data_set_error_says_where_it_looked_and_how_to_get_it(tmp_path, cls, name):
    dm = cls(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"{name} was not found under data_dir=.*download: true"):
        dm.setup()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"batch_size": 0}, r"`batch_size` must be an integer >= 1, got 0"),
        ({"batch_size": 5000}, r"`batch_size` must be at most the 1257 training digits, got 5000"),
        ({"val_size": 1000, "test_size": 1000}, r"must leave training data"),
        ({"num_workers": -1}, r"`num_workers` must be an integer >= 0, got -1"),
    ],
)
def test_bad_digits_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").exists(), reason="needs ../shared/data/MNIST")
def test_mnist_train_size_is_a_fixed_prefix_of_the_seeded_split_and_leaves_validation_alone():
    full = MNISTDataModule(data_dir=str(SHARED_DATA), val_size=5000)
    small = MNISTDataModule(data_dir=str(SHARED_DATA), val_size=5000, train_size=1200)
    full.setup("fit")
    small.setup("fit")
    assert len(small.train_set) == 1200
    assert small.train_set.indices == full.train_set.indices[:1200]
    assert small.val_set.indices == full.val_set.indices
    with pytest.raises(ValueError, match=r"`train_size` must be at most the 55000 .* got 55001"):
        MNISTDataModule(data_dir=str(SHARED_DATA), val_size=5000, train_size=55001).setup("fit")
    with pytest.raises(ValueError, match=r"`train_size` must be an integer >= 1 or None, got 0"):
        MNISTDataModule(data_dir=str(SHARED_DATA), train_size=0)
