"""The selection rules on their own: counts, exact top-k sets, random subsets."""

from __future__ import annotations

import pytest
import torch

from lightning_advsel.selection import fraction_count, random_k, top_k


@pytest.mark.parametrize("n,fraction,expected", [(128, 0.5, 64), (10, 0.25, 3), (10, 0.24, 2), (7, 1.0, 7),
                                                 (5, 0.01, 1), (0, 0.5, 0)])
def test_fraction_count_rounds_half_up_and_keeps_at_least_one(n, fraction, expected):
    assert fraction_count(n, fraction) == expected


def test_top_k_returns_exactly_the_largest_scores():
    scores = torch.tensor([0.1, 5.0, -2.0, 3.0, 3.5, 0.0])
    assert top_k(scores, 3).tolist() == [1, 3, 4]
    assert top_k(scores, 6).tolist() == list(range(6))


def test_top_k_agrees_with_a_full_sort_on_random_scores():
    scores = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    k = 137
    expected = set(torch.argsort(scores, descending=True)[:k].tolist())
    assert set(top_k(scores, k).tolist()) == expected


def test_random_k_draws_distinct_indices_reproducibly_and_covers_the_pool():
    a = random_k(20, 5, device=torch.device("cpu"), generator=torch.Generator().manual_seed(3))
    b = random_k(20, 5, device=torch.device("cpu"), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and len(set(a.tolist())) == 5 and a.max() < 20
    gen = torch.Generator().manual_seed(0)
    hits = torch.zeros(20)
    for _ in range(400):
        hits[random_k(20, 5, device=torch.device("cpu"), generator=gen)] += 1
    # Each index is picked with probability 1/4: 100 of 400 draws on average.
    assert hits.min() > 60 and hits.max() < 140
