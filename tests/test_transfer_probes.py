"""Linear probes: planted rules are recovered; the fast ridge path matches direct solves."""

import numpy as np
import pytest
import torch

from loes import LOESError
from loes.transfer import LinearProbe, split_indices
from loes.transfer._probes import RIDGE_GRID, LayerStandardizer, take_layers


def _planted(n=600, n_layers=5, dim=12, layer=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n_layers, dim))
    w = rng.normal(size=dim)
    y = (x[:, layer] @ w > 0).astype(int)
    return x, y, w


@pytest.mark.parametrize("kind", ["ridge", "logistic"])
def test_probe_recovers_planted_linear_rule(kind):
    x, y, _ = _planted()
    probe = LinearProbe(layers=[3], kind=kind).fit(x[:400], y[:400], x[400:500], y[400:500])
    assert probe.score(x[500:], y[500:]) >= 0.93
    # the same probe on uninformative layers is near chance
    noise = LinearProbe(layers=[0, 1], kind=kind).fit(x[:400], y[:400], x[400:500], y[400:500])
    assert noise.score(x[500:], y[500:]) < 0.65


def test_ridge_regression_recovers_coefficients():
    x, _, w = _planted()
    y = x[:, 2] @ w + 0.5
    probe = LinearProbe(layers=[2], task="regression").fit(x[:400], y[:400], x[400:500], y[400:500])
    pred = probe.predict(x[500:])
    assert np.sqrt(np.mean((pred - y[500:]) ** 2)) < 0.05 * y.std()
    np.testing.assert_allclose(pred, y[500:], atol=0.1)
    # score() is R², higher is better (scikit-learn's convention; it was the RMSE)
    r2 = 1 - np.sum((y[500:] - pred) ** 2) / np.sum((y[500:] - y[500:].mean()) ** 2)
    assert probe.score(x[500:], y[500:]) == pytest.approx(r2, rel=1e-10)
    assert probe.score(x[500:], y[500:]) > 0.99


def test_ridge_path_matches_direct_solves():
    """The SVD path's validation score for every grid value equals a fit with that value."""
    x, y, _ = _planted(n=300, dim=40)
    y3 = np.digitize(x[:, 3, :5].sum(1), [-1, 1])
    probe = LinearProbe(layers=[1, 3], kind="ridge").fit(x[:150], y3[:150], x[150:220], y3[150:220])
    for rel in RIDGE_GRID[::3]:
        direct = LinearProbe(layers=[1, 3], kind="ridge", grid=[rel]).fit(
            x[:150], y3[:150], x[150:220], y3[150:220]
        )
        assert direct.score(x[150:220], y3[150:220]) == pytest.approx(
            probe.val_scores_[rel], abs=1e-12
        )


def test_ridge_fit_matches_normal_equations():
    """Primal (N > D) and dual (N < D) closed forms agree with a textbook solve."""
    rng = np.random.default_rng(1)
    for n, d in [(80, 10), (30, 60)]:
        x = rng.normal(size=(n, 1, d))
        y = rng.normal(size=n)
        probe = LinearProbe(task="regression", grid=[0.5]).fit(x, y, x[:10], y[:10])
        z = (
            LayerStandardizer()
            .fit([torch.from_numpy(x[:, 0])])
            .transform([torch.from_numpy(x[:, 0])])
            .numpy()
        )
        zc = z - z.mean(0)
        lam = 0.5 * np.trace(zc.T @ zc) / np.linalg.matrix_rank(zc)
        w = np.linalg.solve(zc.T @ zc + lam * np.eye(d), zc.T @ (y - y.mean()))
        np.testing.assert_allclose(probe.predict(x), zc @ w + y.mean(), rtol=1e-7, atol=1e-9)


def test_probe_unchanged_by_layer_scale():
    x, y, _ = _planted()
    a = LinearProbe(layers=[3, 4]).fit(x[:400], y[:400], x[400:500], y[400:500])
    x2 = x.copy()
    x2[:, 3] *= 1000.0
    x2[:, 4] *= 1e-3
    b = LinearProbe(layers=[3, 4]).fit(x2[:400], y[:400], x2[400:500], y[400:500])
    np.testing.assert_array_equal(a.predict(x[500:]), b.predict(x2[500:]))


def test_string_labels_and_internal_validation_split():
    x, y, _ = _planted()
    names = np.array(["neg", "pos"])[y]
    probe = LinearProbe(layers=[3]).fit(x[:400], names[:400])
    assert set(probe.predict(x[500:])) <= {"neg", "pos"}
    assert probe.score(x[500:], names[500:]) >= 0.93


def test_probe_errors():
    x, y, _ = _planted(n=50)
    with pytest.raises(LOESError, match="logistic probe is for classification"):
        LinearProbe(kind="logistic", task="regression").fit(x, y.astype(float))
    with pytest.raises(LOESError, match="out of range"):
        take_layers(x, [7])
    with pytest.raises(LOESError, match="not fitted"):
        LinearProbe().predict(x)
    with pytest.raises(LOESError, match="at least 2 classes"):
        LinearProbe().fit(x, np.zeros(50, dtype=int))


def test_split_indices_stratified_disjoint_and_seeded():
    labels = np.repeat([0, 1, 2], [100, 40, 20])
    parts = split_indices(len(labels), (0.25, 0.4, 0.15, 0.2), 3, labels)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(labels) and len(np.unique(allidx)) == len(labels)
    for p, share in zip(parts, (0.25, 0.4, 0.15, 0.2)):
        counts = np.bincount(labels[p], minlength=3)
        np.testing.assert_allclose(counts, share * np.array([100, 40, 20]), atol=1.0)
    again = split_indices(len(labels), (0.25, 0.4, 0.15, 0.2), 3, labels)
    assert all((a == b).all() for a, b in zip(parts, again))
    other = split_indices(len(labels), (0.25, 0.4, 0.15, 0.2), 4, labels)
    assert not all((a == b).all() for a, b in zip(parts, other))
