"""The models: the normalization layer they carry (channel statistics broadcast along dimension 1 of any input)
and the small CNN's options."""

from __future__ import annotations

import pytest
import torch

from lightning_advsel import Normalize


def test_images_are_normalized_per_channel():
    layer = Normalize((0.5, 0.25), (0.5, 0.25))
    x = torch.rand(4, 2, 3, 3)
    out = layer(x)
    assert torch.allclose(out[:, 0], (x[:, 0] - 0.5) / 0.5) and torch.allclose(out[:, 1], (x[:, 1] - 0.25) / 0.25)


def test_feature_vectors_are_normalized_per_feature_and_keep_their_shape():
    layer = Normalize((0.1, 0.2, 0.3), (1.0, 2.0, 4.0))
    x = torch.rand(5, 3)
    out = layer(x)
    assert out.shape == (5, 3)
    assert torch.allclose(out, (x - torch.tensor([0.1, 0.2, 0.3])) / torch.tensor([1.0, 2.0, 4.0]))


def test_one_statistic_serves_every_channel_or_feature():
    layer = Normalize((0.5,), (0.5,))
    assert layer(torch.ones(2, 7)).shape == (2, 7) and torch.equal(layer(torch.ones(2, 7)), torch.ones(2, 7))
    assert layer(torch.zeros(2, 3, 4, 4)).shape == (2, 3, 4, 4)


def test_an_input_with_another_channel_count_is_refused_naming_the_shapes():
    with pytest.raises(ValueError, match=r"3 channel statistics; it needs inputs \(B, 3, \.\.\.\), got shape \(5, 4\)"):
        Normalize((0.1, 0.2, 0.3), (1.0, 1.0, 1.0))(torch.rand(5, 4))


@pytest.mark.parametrize("mean,std,match", [
    ((), (), r"one entry per channel, got 0 means \[\] and 0 stds \[\]"),
    ((0.5, 0.5), (0.2,), r"one entry per channel, got 2 means \[0.5, 0.5\] and 1 stds \[0.2\]"),
    ((float("nan"),), (0.2,), r"`mean` must be finite numbers, got \[nan\]"),
    ((0.5,), (float("inf"),), r"`std` must be finite numbers, got \[inf\]"),
    ((0.5,), (True,), r"`std` must be finite numbers, got \[True\]"),
    ((0.5, 0.5), (0.2, -0.1), r"`std` entries must be > 0, got \[0.2, -0.1\]"),
])
def test_statistics_that_cannot_normalize_are_refused_naming_the_values(mean, std, match):
    with pytest.raises(ValueError, match=match):
        Normalize(mean, std)


def test_statistics_from_arrays_and_tensors_are_taken_as_numbers():
    import numpy as np

    x = torch.rand(2, 3, 4, 4)
    reference = Normalize((0.1, 0.2, 0.3), (0.5, 0.25, 2.0))(x)
    for mean, std in ((np.array([0.1, 0.2, 0.3], dtype=np.float32), np.array([0.5, 0.25, 2.0], dtype=np.float32)),
                      (torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.25, 2.0]))):
        assert torch.allclose(Normalize(mean, std)(x), reference)
    with pytest.raises(ValueError, match=r"`std` must be finite numbers"):
        Normalize(torch.tensor([0.1]), torch.tensor([float("nan")]))


def test_small_cnn_takes_a_batchnorm_after_each_convolution_only_when_asked():
    from lightning_advsel.models import SmallCNN

    x = torch.rand(4, 3, 32, 32)
    plain = SmallCNN(in_channels=3, input_size=32, width=8, hidden=16)
    normed = SmallCNN(in_channels=3, input_size=32, width=8, hidden=16, batch_norm=True)
    convs = [m for m in plain.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(c.bias is not None for c in convs)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    norms = [m for m in normed.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [n.num_features for n in norms] == [8, 8, 16, 16]
    assert all(c.bias is None for c in normed.modules() if isinstance(c, torch.nn.Conv2d))  # BatchNorm's shift
    assert plain(x).shape == normed(x).shape == (4, 10)
    # Without the option the parameter names are the ones checkpoints of this network hold.
    assert "features.2.weight" in plain.state_dict() and "features.3.weight" in normed.state_dict()
    with pytest.raises(ValueError, match="batch_norm"):
        SmallCNN(batch_norm="yes")
