"""loes._splits: the one allocator, stratified split and fold maker."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loes import LOESError
from loes._splits import allocate, holdout_split, kfold, split_indices
from loes.hf.sampling import calibration_indices


def _slow_allocate(total, weights, capacity=None):
    """Hamilton's method one item at a time: floors, the minimum of one, then the largest remainders."""
    w = np.asarray(weights, float)
    share = total * w / w.sum()
    cap = [10**9] * len(w) if capacity is None else list(capacity)
    count = [min(int(np.floor(s)), c) for s, c in zip(share, cap)]
    if total >= len(w):
        count = [min(max(c, 1), k) for c, k in zip(count, cap)]
    while sum(count) < total:
        best = max((share[p] - count[p], -p) for p in range(len(w)) if count[p] < cap[p])
        count[-best[1]] += 1
    while sum(count) > total:
        best = max((count[p] - share[p], -p) for p in range(len(w)) if count[p] > 1)
        count[-best[1]] -= 1
    return count


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 300), st.lists(st.floats(0.01, 100.0), min_size=1, max_size=8))
def test_allocate_sums_keeps_proportions_and_equals_the_slow_twin(total, weights):
    count = allocate(total, weights)
    assert count.sum() == total and (count >= 0).all()
    assert count.tolist() == _slow_allocate(total, weights)
    share = total * np.asarray(weights) / sum(weights)
    if total >= len(weights):
        assert (count >= 1).all()
        assert (np.abs(count - share) < 1 + len(weights)).all()
    else:  # no minimum: plain largest remainder, each count within 1 of its share
        assert (np.abs(count - share) < 1).all()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=6), st.integers(1, 100))
def test_allocate_respects_capacity(sizes, budget):
    budget = min(budget, sum(sizes))
    count = allocate(budget, sizes, capacity=sizes)
    assert count.sum() == budget and (count <= np.asarray(sizes)).all()
    assert count.tolist() == _slow_allocate(budget, sizes, sizes)


def test_allocate_examples():
    assert allocate(10, [5, 3, 2]).tolist() == [5, 3, 2]
    assert allocate(10, [0.9, 0.05, 0.05]).tolist() == [8, 1, 1]
    assert allocate(7, [1, 1, 1]).tolist() == [3, 2, 2]  # ties: the earlier part
    assert allocate(2, [1, 1, 1]).tolist() == [1, 1, 0]


def test_stratified_split_is_disjoint_covering_balanced_and_seeded():
    labels = np.repeat([0, 1, 2], [60, 30, 10])
    parts = split_indices(100, (0.5, 0.3, 0.2), 7, labels)
    every = np.sort(np.concatenate(parts))
    assert every.tolist() == list(range(100))
    for part, frac in zip(parts, (0.5, 0.3, 0.2)):
        counts = np.bincount(labels[part], minlength=3)
        np.testing.assert_array_equal(counts, allocate_counts(frac))
    again = split_indices(100, (0.5, 0.3, 0.2), np.random.default_rng(7), labels)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = split_indices(100, (0.5, 0.3, 0.2), 8, labels)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def allocate_counts(frac):
    table = {0.5: [30, 15, 5], 0.3: [18, 9, 3], 0.2: [12, 6, 2]}
    return table[frac]


def test_kfold_and_holdout():
    labels = torch.tensor([0] * 13 + [1] * 7)
    folds = kfold(20, 4, 0, labels)
    held = [h for _, h in folds]
    assert sorted(np.concatenate(held).tolist()) == list(range(20))
    for train, h in folds:
        assert np.intersect1d(train, h).size == 0 and len(train) + len(h) == 20
        assert (labels[h] == 1).sum() >= 1  # every class with >= 4 samples is in every fold
    assert [len(h) for h in held] == [6, 5, 5, 4]
    fit, out = holdout_split(20, 0.25, 0, labels)
    assert len(out) == 5 and np.intersect1d(fit, out).size == 0


def test_calibration_sample_uses_the_allocator():
    y = np.repeat([0, 1, 2, 3], [70, 20, 9, 1])
    idx = calibration_indices(100, 12, y, random_state=0)
    assert (
        np.bincount(y[idx], minlength=4).tolist()
        == allocate(12, [70, 20, 9, 1], [70, 20, 9, 1]).tolist()
    )


BAD = [
    (lambda: split_indices(10, [0.5, -0.5]), "fractions must be positive finite numbers"),
    (lambda: split_indices(10, [0.5, float("nan")]), "fractions must be positive finite numbers"),
    (lambda: split_indices(10, []), "fractions must be positive finite numbers"),
    (lambda: split_indices(10, [[0.5, 0.5]]), "fractions must be positive finite numbers"),
    (lambda: split_indices(10, [1, 1], 0, np.zeros(9)), "labels must have 10 entries"),
    (lambda: split_indices(10, [1, 1], 1.5), "random_state must be None, an int seed"),
    (lambda: split_indices(10, [1, 1], "3"), "random_state must be None, an int seed"),
    (lambda: split_indices(10, [1, 1], -1), "non-negative integer seed"),
    (lambda: kfold(3, 5), "cv=5 leaves an empty fold with 3 samples"),
    (lambda: holdout_split(10, 1.5), "fractions must be positive finite numbers"),
    (lambda: holdout_split(10, 0.0), "fractions must be positive finite numbers"),
]


@pytest.mark.parametrize("call,message", BAD)
def test_bad_inputs(call, message):
    with pytest.raises(LOESError, match=message):
        call()
