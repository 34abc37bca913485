"""Baselines return what they claim: greedy equals its definition, exhaustive finds the best subset."""

import itertools
import math

import numpy as np
import pytest
import torch

from loes import LOESError, select_layers_from_custom_embeddings
from loes.baselines import BASELINES, HEADS, loo_probe_error, select_baseline


def _standardize(x):
    x = x - x.mean(0)
    std = x.std(0)
    std[std == 0] = 1.0
    return x / (std * math.sqrt(x.shape[1]))


def _slow_loo_error(layers, labels, reg=1e-1, regression=False):
    """Leave-one-out by N explicit ridge refits (the relative ridge uses the full data, like the hat-matrix form)."""
    x = np.concatenate([_standardize(layer) for layer in layers], axis=1)
    n, d = x.shape
    y = labels[:, None].astype(float) if regression else np.eye(labels.max() + 1)[labels]
    xc = x - x.mean(0)
    lam = reg * np.trace(xc.T @ xc) / min(n - 1, d)
    preds = np.empty_like(y)
    for i in range(n):
        keep = np.arange(n) != i
        xm, ym = x[keep].mean(0), y[keep].mean(0)
        a, b = x[keep] - xm, y[keep] - ym
        w = np.linalg.solve(a.T @ a + lam * np.eye(d), a.T @ b)
        preds[i] = (x[i] - xm) @ w + ym
    if regression:
        return float(((y - preds) ** 2).mean() / y.var())
    return float((preds.argmax(1) != labels).mean())


def _complementary(n=160, seed=0):
    """Label = 2a + b. Layers 2 and 3 carry a strongly (redundant), layer 4 carries b,
    layer 1 carries a less strongly, layer 4 carries b weakly, layers 0 and 5 are noise."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 2, n), rng.integers(0, 2, n)
    x = rng.normal(size=(n, 6, 4))
    x[:, 2, 0] += 3.0 * a
    x[:, 3, 0] += 3.0 * a
    x[:, 1, 0] += 2.5 * a
    x[:, 4, 0] += 1.5 * b
    return x, 2 * a + b


def test_fixed_baselines_follow_their_definitions():
    x = np.random.default_rng(0).normal(size=(40, 7, 3))
    assert select_baseline("last", x, k=3).selected_layers == [6]
    assert select_baseline("last_k", x, k=3).selected_layers == [4, 5, 6]
    for name in ("all_concat", "layer_weights"):
        res = select_baseline(name, x, k=2)
        assert res.selected_layers == list(range(7))
        assert res.config["head"] == HEADS[name]
    assert HEADS["layer_weights"] == "layer_weights" and HEADS["all_concat"] == "concat"


def test_random_k_is_seeded_distinct_and_varies():
    x = np.random.default_rng(0).normal(size=(40, 12, 3))
    picks = [
        tuple(select_baseline("random_k", x, k=4, random_state=s).selected_layers) for s in range(6)
    ]
    assert all(len(set(p)) == 4 and all(0 <= i < 12 for i in p) for p in picks)
    assert picks[0] == tuple(select_baseline("random_k", x, k=4, random_state=0).selected_layers)
    assert len(set(picks)) > 1


def test_loo_probe_error_matches_explicit_refits():
    x, y = _complementary(n=60)
    layers = [torch.from_numpy(_standardize(x[:, i])) for i in (1, 4)]
    y1 = torch.nn.functional.one_hot(torch.from_numpy(y)).double()
    err, _ = loo_probe_error(layers, y1, torch.from_numpy(y))
    assert err == pytest.approx(_slow_loo_error([x[:, 1], x[:, 4]], y), abs=1e-12)


def test_greedy_equals_its_definition():
    x, y = _complementary()
    res = select_baseline("greedy_probe", x, y, k=3)
    slow = [_slow_loo_error([x[:, i]], y) for i in range(6)]
    order = sorted(range(6), key=lambda i: slow[i])
    assert sorted(slow[i] for i in res.selected_layers) == sorted(slow[i] for i in order[:3])
    np.testing.assert_allclose(res.steps[0].terms["fit"], slow, atol=1e-12)
    assert set(res.selected_layers[:2]) == {2, 3}  # the two strong, redundant layers


def test_exhaustive_finds_the_true_best_subset():
    x, y = _complementary()
    res = select_baseline("exhaustive", x, y, k=2)
    brute = {
        s: _slow_loo_error([x[:, i] for i in s], y) for s in itertools.combinations(range(6), 2)
    }
    best = min(brute.values())
    assert brute[tuple(res.selected_layers)] == pytest.approx(best, abs=1e-12)
    assert 4 in res.selected_layers  # b is only in layer 4: the best pair needs it
    greedy = select_baseline("greedy_probe", x, y, k=2)
    assert 4 not in greedy.selected_layers  # ...which greedy top-k misses


def test_exhaustive_refuses_too_many_subsets():
    x = np.random.default_rng(0).normal(size=(30, 20, 2))
    y = np.arange(30) % 2
    with pytest.raises(LOESError, match="exceeds max_combinations"):
        select_baseline("exhaustive", x, y, k=5, max_combinations=1000)


def test_regression_baselines_find_the_informative_layer():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(120, 5, 6))
    y = x[:, 3] @ rng.normal(size=6)
    res = select_baseline("greedy_probe", x, y, k=1, task="regression")
    assert res.selected_layers == [3]
    slow = [_slow_loo_error([x[:, i]], y, regression=True) for i in range(5)]
    np.testing.assert_allclose(res.steps[0].terms["fit"], slow, rtol=1e-9)
    assert 3 in select_baseline("exhaustive", x, y, k=2, task="regression").selected_layers


def test_label_free_baseline_ranks_by_the_metric():
    x, _ = _complementary()
    res = select_baseline("label_free", x, k=3, metric="loes")
    ref = select_layers_from_custom_embeddings(x, None, 3, task="label_free", show_progress=False)
    assert res.selected_layers == ref.selected_layers
    assert res.config["method"] == "label_free"
    # effective rank, higher is better: layers squeezed into fewer directions rank last
    g = np.random.default_rng(1).normal(size=(200, 4, 16))
    g[:, 0, 2:] = 0
    g[:, 3, 6:] = 0
    by_rank = select_baseline("label_free", g, k=2, metric="effective_rank")
    assert sorted(by_rank.selected_layers) == [1, 2]
    with pytest.raises(LOESError, match="unknown label-free metric"):
        select_baseline("label_free", g, k=2, metric="vibes")


def test_unknown_baseline_and_missing_targets():
    x, _ = _complementary(n=20)
    with pytest.raises(LOESError, match="unknown baseline"):
        select_baseline("best", x, k=2)
    with pytest.raises(LOESError, match="targets are required"):
        select_baseline("greedy_probe", x, None, k=2)
    assert set(BASELINES) == set(HEADS)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_kernel_loo_matches_feature_loo(task):
    """The summed-kernel (dual) LOO used by exhaustive search equals the feature form."""
    from loes.baselines import _kernel_loo_error

    rng = np.random.default_rng(4)
    x = rng.normal(size=(40, 3, 30))
    labels = rng.integers(0, 3, 40)
    layers = [torch.from_numpy(_standardize(x[:, i])) for i in range(3)]
    if task == "classification":
        y, lab = (
            torch.nn.functional.one_hot(torch.from_numpy(labels)).double(),
            torch.from_numpy(labels),
        )
    else:
        y, lab = (
            torch.from_numpy(x[:, 0, :2].sum(1, keepdims=True) + rng.normal(size=(40, 1))),
            None,
        )
    kernel = sum(layer @ layer.T for layer in layers[:2])
    fast = _kernel_loo_error(kernel, 60, y, lab, 0.1)
    slow = loo_probe_error(layers[:2], y, lab, 0.1)
    assert fast[0] == pytest.approx(slow[0], abs=1e-12)
    assert fast[1] == pytest.approx(slow[1], rel=1e-8)


def test_exhaustive_dual_path_finds_the_true_best_subset():
    # N = 40 samples < 2 x 30 dims: the kernel path is used
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 2, 40), rng.integers(0, 2, 40)
    x = rng.normal(size=(40, 5, 30))
    x[:, 1, :10] += 2.0 * a[:, None]
    x[:, 3, :10] += 2.0 * b[:, None]
    y = 2 * a + b
    res = select_baseline("exhaustive", x, y, k=2)
    brute = {
        s: _slow_loo_error([x[:, i] for i in s], y) for s in itertools.combinations(range(5), 2)
    }
    assert brute[tuple(res.selected_layers)] == pytest.approx(min(brute.values()), abs=1e-12)
    assert res.selected_layers == [1, 3]
