"""The quality benchmark's protocol, probe and oracle (benchmarks/_quality.py), on synthetic data."""

import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _quality as Q  # noqa: E402


def _layers(n=90, dims=(3, 5, 4, 6, 2, 7), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(n, d)) for d in dims], rng


def _planted(n=150, seed=0):
    """6 layers; class = sign pattern of layer 1's first and layer 4's first feature."""
    layers, rng = _layers(n, seed=seed)
    y = rng.integers(0, 4, n)
    layers[1][:, 0] += 2.5 * (y % 2 * 2 - 1)
    layers[4][:, 0] += 2.5 * (y // 2 * 2 - 1)
    return layers, y


def _brute_force(z, subset, train, test, ytr, yte):
    """Explicit kernel ridge of one subset: concatenated scaled features, one solve per lambda."""
    x = np.concatenate([z[i] / np.sqrt(z[i].shape[1]) for i in subset], axis=1)
    classes = np.unique(ytr)
    clf = np.issubdtype(ytr.dtype, np.integer)
    Y = (ytr[:, None] == classes).astype(float) if clf else ytr[:, None]
    Yte = (yte[:, None] == classes).astype(float) if clf else yte[:, None]
    gram = x[train] @ x[train].T
    best = (-np.inf, -np.inf)
    for lam in Q.ORACLE_LAMBDAS:
        alpha = np.linalg.solve(
            gram + lam * np.trace(gram) / len(train) * np.eye(len(train)), Y - Y.mean(0)
        )
        pred = x[test] @ x[train].T @ alpha + Y.mean(0)
        if clf:
            score = np.mean(classes[pred.argmax(1)] == yte)
        else:
            score = 1 - np.sum((yte - pred[:, 0]) ** 2) / np.sum((yte - yte.mean()) ** 2)
        best = max(best, (score, -np.mean((pred - Yte) ** 2)))
    return best


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_oracle_equals_brute_force(task):
    layers, rng = _layers()
    y = (
        rng.integers(0, 3, 90)
        if task == "classification"
        else rng.normal(size=90) + layers[2][:, 0]
    )
    cal, train, test = Q.split_indices(y, seed=1)
    z = Q.zscore(layers, train)
    k_tr, k_te = Q.layer_kernels(z, train, test)
    fast = Q.subset_scores(k_tr, k_te, y[train], y[test], combinations(range(6), 2))
    slow = {
        s: _brute_force(z, s, train, test, y[train], y[test]) for s in combinations(range(6), 2)
    }
    assert len(fast) == 15
    for s in slow:
        np.testing.assert_allclose(fast[s], slow[s], rtol=0, atol=1e-8)
    best, score, mode = Q.oracle_subset(k_tr, k_te, y[train], y[test], 2)
    assert mode == "exhaustive"
    assert best == max(slow, key=slow.get) and score == pytest.approx(slow[best], abs=1e-8)
    ranked, _ = Q.oracle_ranking(k_tr, k_te, y[train], y[test], 2)
    assert [s for s, _ in ranked] == sorted(slow, key=lambda s: (-slow[s][0], -slow[s][1], s))


def test_greedy_fallback_agrees_with_exhaustive():
    layers, y = _planted()
    _, train, test = Q.split_indices(y, seed=0)
    k_tr, k_te = Q.layer_kernels(Q.zscore(layers, train), train, test)
    ex = Q.oracle_subset(k_tr, k_te, y[train], y[test], 2)
    gr = Q.oracle_subset(k_tr, k_te, y[train], y[test], 2, max_subsets=10)  # C(6, 2) = 15 > 10
    assert ex[2] == "exhaustive" and gr[2] == "greedy"
    assert ex[0] == gr[0] == (1, 4)
    assert ex[1] == gr[1]
    # k = 1 is the same search either way, on any data; every subset greedy saw has the exhaustive score
    rand, rng = _layers(seed=3)
    yr = rng.integers(0, 3, 90)
    _, tr, te = Q.split_indices(yr, seed=0)
    kt, ke = Q.layer_kernels(Q.zscore(rand, tr), tr, te)
    assert (
        Q.oracle_subset(kt, ke, yr[tr], yr[te], 1)[:2]
        == Q.oracle_subset(kt, ke, yr[tr], yr[te], 1, 1)[:2]
    )
    _, seen = Q.greedy_subset(kt, ke, yr[tr], yr[te], 3)
    full = Q.subset_scores(kt, ke, yr[tr], yr[te], list(seen))
    assert seen == full and len(seen) == 6 + 5 + 4


@pytest.mark.parametrize("seed", [0, 7])
def test_splitter_is_stratified_disjoint_with_the_stated_fractions(seed):
    y = np.repeat(np.arange(4), [50, 30, 13, 7])
    cal, train, test = Q.split_indices(y, seed)
    assert (
        len(np.intersect1d(cal, train))
        == len(np.intersect1d(cal, test))
        == len(np.intersect1d(train, test))
        == 0
    )
    np.testing.assert_array_equal(np.sort(np.concatenate([cal, train, test])), np.arange(len(y)))
    for part, share in zip((cal, train, test), Q.FRACTIONS):
        counts = np.bincount(y[part], minlength=4)
        assert np.all(np.abs(counts - share * np.bincount(y)) <= 1), (share, counts)
    again = Q.split_indices(y, seed)
    assert all(np.array_equal(a, b) for a, b in zip(again, (cal, train, test)))
    assert not np.array_equal(Q.split_indices(y, seed + 1)[0], cal)
    # numeric targets: stratified by quintiles
    v = np.random.default_rng(seed).normal(size=200)
    c, tr, te = Q.split_indices(v, seed)
    assert (len(c), len(tr), len(te)) == (40, 100, 60)
    bins = np.digitize(v, np.quantile(v, [0.2, 0.4, 0.6, 0.8]))
    assert np.all(np.bincount(bins[c], minlength=5) == 8)


def test_probe_finds_planted_signal_and_not_noise():
    rng = np.random.default_rng(0)
    n, d = 300, 400  # D > n_train: the row-space path of the probe
    y = rng.integers(0, 3, n)
    noise = rng.normal(size=(n, d))
    signal = noise.copy()
    signal[:, :30] += 1.2 * np.repeat(y[:, None] == np.arange(3), 10, axis=1)  # 10 features/class
    _, train, test = Q.split_indices(y, 0)
    scores = {}
    for name, x in (("signal", signal), ("noise", noise)):
        z = Q.zscore([x], train)[0]
        scores[name] = Q.probe_score(z[train], y[train], z[test], y[test])[0]
    assert scores["signal"] > 0.75
    assert scores["noise"] < 0.5


def test_row_space_probe_equals_full_logistic():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    xtr, xte, y = rng.normal(size=(40, 120)), rng.normal(size=(25, 120)), rng.integers(0, 3, 40)
    ptr, pte = Q._row_space(xtr, xte)
    assert ptr.shape == (40, 40)
    fast = LogisticRegression(C=0.1, tol=1e-10, max_iter=10000).fit(ptr, y).decision_function(pte)
    slow = LogisticRegression(C=0.1, tol=1e-10, max_iter=10000).fit(xtr, y).decision_function(xte)
    np.testing.assert_allclose(fast, slow, atol=1e-5)


def test_run_split_reports_every_method():
    layers, y = _planted(n=160)
    out = Q.run_split(layers, y, seed=0, k=2)
    assert set(out["scores"]) == set(Q.SELECTORS) | set(Q.REFERENCES)
    assert out["layers"]["last"] == [5] and out["layers"]["last_k"] == [4, 5]
    assert len(out["layers"]["loes"]) == 2 and len(out["layers"]["loes_k4"]) == 4
    assert out["layers"]["oracle_k"] == out["layers"]["oracle_k_top1"] == [1, 4]
    assert out["scores"]["oracle_single"] == max(out["single"])
    assert out["scores"]["oracle_k"] > out["scores"]["last"] + 0.2
    sizes = np.array([out["n_cal"], out["n_train"], out["n_test"]])
    assert sizes.sum() == 160 and np.all(
        np.abs(sizes - 160 * np.array(Q.FRACTIONS)) <= 4
    )  # 4 classes
