"""Pooling against per-row loops, and calibration sampling."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from loes import LOESError, LOESWarning
from loes.hf.pooling import pool, resolve_pooling
from loes.hf.sampling import calibration_indices


def _padded(side: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 2, 7, 1]
    T = max(lengths)
    states = torch.randn(len(lengths), T, 6, generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = True
        else:
            mask[i, T - n :] = True
    states[~mask] = float("nan")  # padded positions must never leak in
    return states, mask, lengths


@pytest.mark.parametrize("side", ["right", "left"])
def test_masked_mean_and_last_token_match_row_loops(side):
    states, mask, lengths = _padded(side)
    mean = pool(states, mask, "masked_mean")
    last = pool(states, mask, "last_token")
    for i in range(len(lengths)):
        real = states[i][mask[i]]
        torch.testing.assert_close(mean[i], real.mean(0), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(last[i], real[-1], atol=0, rtol=0)


def test_cls_mean_and_spatial():
    x = torch.randn(3, 4, 5)
    torch.testing.assert_close(pool(x, None, "cls"), x[:, 0])
    torch.testing.assert_close(pool(x, None, "mean"), x.mean(1))
    torch.testing.assert_close(pool(x, None, "last_token"), x[:, -1])
    img = torch.randn(2, 3, 4, 5)
    hand = torch.stack([torch.stack([img[b, c].mean() for c in range(3)]) for b in range(2)])
    torch.testing.assert_close(pool(img, None, "mean"), hand, atol=1e-6, rtol=1e-6)


def test_half_precision_states_pool_in_float32():
    x = torch.full((2, 4000, 3), 0.1, dtype=torch.bfloat16)
    out = pool(x, torch.ones(2, 4000, dtype=torch.bool), "masked_mean")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((2, 3), float(x[0, 0, 0])), atol=1e-6, rtol=0)


def test_resolve_pooling_auto_by_family():
    assert resolve_pooling("auto", "text", "bert") == "cls"
    assert resolve_pooling("auto", "text", "t5") == "masked_mean"
    assert resolve_pooling("auto", "decoder", "llama") == "last_token"
    assert resolve_pooling("auto", "vision", "dinov2") == "cls"
    assert resolve_pooling("auto", "audio", "wav2vec2") == "masked_mean"
    assert resolve_pooling("auto", "vision", "convnext", state_ndim=4) == "mean"
    with pytest.raises(LOESError, match="pooling must be"):
        resolve_pooling("median", "text", "bert")


# ---------------------------------------------------------------- sampling
def test_stratified_sample_of_a_label_sorted_split_keeps_proportions():
    y = np.repeat([0, 1, 2, 3], [400, 300, 200, 100])
    idx = calibration_indices(len(y), 100, y, random_state=0)
    assert len(idx) == 100 and len(set(idx)) == 100
    np.testing.assert_array_equal(np.bincount(y[idx]), [40, 30, 20, 10])
    first_n = np.arange(100)  # what the published code takes
    assert len(np.unique(y[first_n])) == 1


def test_rare_classes_get_at_least_one_row_and_budget_is_exact():
    y = np.array([0] * 995 + [1, 2, 3, 4, 5])
    idx = calibration_indices(len(y), 20, y, random_state=3)
    assert len(idx) == 20
    assert set(np.unique(y[idx])) == {0, 1, 2, 3, 4, 5}


def test_sampling_is_seeded_and_leaves_the_global_rng_alone():
    y = np.arange(1000) % 7
    np.random.seed(5)
    before = np.random.get_state()[1].copy()
    a = calibration_indices(1000, 50, y, random_state=11)
    b = calibration_indices(1000, 50, y, random_state=11)
    c = calibration_indices(1000, 50, y, random_state=12)
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_unstratified_sample_is_uniform_not_the_first_rows():
    idx = calibration_indices(10_000, 500, None, random_state=0)
    assert idx.max() > 9000 and idx.min() < 1000


def test_missing_class_warns():
    y = np.array([0] * 50 + [1] * 50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LOESWarning)
        calibration_indices(100, 10, y, all_classes=[0, 1, 2], random_state=0)
    assert any("[2]" in str(w.message) and "no rows" in str(w.message) for w in caught)
    with pytest.warns(LOESWarning, match="missing from the calibration sample"):
        calibration_indices(100, 1, y, random_state=0)


def test_all_rows_when_cap_is_large():
    np.testing.assert_array_equal(calibration_indices(7, None), np.arange(7))
    np.testing.assert_array_equal(calibration_indices(7, 100), np.arange(7))
    with pytest.raises(LOESError, match="positive integer"):
        calibration_indices(7, 0)
