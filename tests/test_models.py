"""The normalization layer the models carry: channel statistics broadcast along dimension 1 of any input."""

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
