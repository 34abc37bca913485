"""Layer sweep: per-layer cross-validated ridge probes."""

import numpy as np
import pytest

from loes import LOESError
from loes.sweep import DEFAULT_ALPHAS, LayerSweep, ridge_gcv_fit, sweep_layers
from loes.transfer._probes import split_indices


@pytest.fixture
def rng():
    return np.random.default_rng(5)


def slow_gcv_ridge(x, y, alphas):
    """Explicit hat matrix for every λ, primal solve for the winner.

    GCV counts the intercept in the hat matrix's trace, ``1 + tr(H_c)`` (the
    core's definition; before issue 10 the sweep left it out)."""
    n, d = x.shape
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    scale = np.trace(xc.T @ xc) / min(n - 1, d)
    scores = []
    for a in alphas:
        lam = a * scale
        h = xc @ np.linalg.solve(xc.T @ xc + lam * np.eye(d), xc.T)
        err = ((yc - h @ yc) ** 2).sum()
        scores.append(err / (n * (1 - (1 + np.trace(h)) / n) ** 2))
    lam = alphas[int(np.argmin(scores))] * scale
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(d), xc.T @ yc)
    return w, ym - xm @ w


@pytest.mark.parametrize("shape", [(60, 10), (25, 40)])  # N > D and N < D
def test_ridge_gcv_matches_hat_matrix_twin(rng, shape):
    x = rng.normal(size=shape) * np.exp(rng.normal(size=shape[1]))
    y = x[:, :2] @ rng.normal(size=(2, 3)) + rng.normal(size=(shape[0], 3))
    w, b, _ = ridge_gcv_fit(x, y)
    w_ref, b_ref = slow_gcv_ridge(x, y, DEFAULT_ALPHAS)
    np.testing.assert_allclose(w, w_ref, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(b, b_ref, rtol=1e-7, atol=1e-10)


def test_ridge_matches_sklearn_at_chosen_strength(rng):
    from sklearn.linear_model import Ridge

    x = rng.normal(size=(80, 6))
    y = x @ rng.normal(size=(6, 1)) + 0.5 * rng.normal(size=(80, 1))
    w, b, lam = ridge_gcv_fit(x, y)
    ref = Ridge(alpha=lam).fit(x, y)
    np.testing.assert_allclose(w[:, 0], np.ravel(ref.coef_), rtol=1e-8)
    np.testing.assert_allclose(b, np.ravel(ref.intercept_), rtol=1e-8)


def test_fold_scores_match_manual_cross_validation(rng):
    y = rng.integers(0, 3, 90)
    x = rng.normal(size=(90, 3, 5))
    x[:, 1, :3] += 1.5 * np.eye(3)[y]
    sweep = LayerSweep(cv=3, random_state=4, show_progress=False).fit(x, y)
    folds = split_indices(90, [1, 1, 1], 4, y)
    onehot = np.eye(3)[y]
    for layer in range(3):
        for f, held in enumerate(folds):
            train = np.setdiff1d(np.arange(90), held)
            w, b = slow_gcv_ridge(x[train, layer], onehot[train], DEFAULT_ALPHAS)
            acc = ((x[held, layer] @ w + b).argmax(1) == y[held]).mean()
            assert sweep.fold_scores_[layer, f] == pytest.approx(acc)


def test_classification_sweep_finds_planted_layer(rng):
    y = rng.integers(0, 4, 400)
    x = rng.normal(size=(400, 6, 10))
    x[:, 4, :4] += 2.0 * np.eye(4)[y]
    x[:, 2, :4] += 0.6 * np.eye(4)[y]
    sweep = sweep_layers(x, y, show_progress=False)
    assert sweep.task_ == "classification" and sweep.best_layer() == 4
    imp = sweep.importances()
    assert sum(imp.values()) == pytest.approx(1.0)
    assert max(imp, key=imp.get) == 4 and imp[2] > max(imp[i] for i in (0, 1, 3, 5))
    assert sweep.baseline_ == pytest.approx(np.bincount(y).max() / 400)
    held = rng.normal(size=(50, 6, 10))
    assert sweep.predict(held).shape == (50,)


def test_scores_are_held_out_not_in_sample(rng):
    # N < D pure noise: an in-sample probe would be perfect, cross-validation is near chance
    y = np.repeat([0, 1], 30)
    x = rng.normal(size=(60, 2, 200))
    x[:, 1, 0] += 3 * (2 * y - 1)
    sweep = LayerSweep(cv=5, show_progress=False).fit(x, y)
    w, b, _ = ridge_gcv_fit(x[:, 0], np.eye(2)[y], alphas=[1e-8])
    assert ((x[:, 0] @ w + b).argmax(1) == y).mean() == 1.0
    assert sweep.scores_[0] < 0.75 and sweep.scores_[1] > 0.9


def test_regression_sweep_r2(rng):
    x = rng.normal(size=(300, 4, 8))
    y = x[:, 3, :2].sum(1) + 0.2 * rng.normal(size=300)
    sweep = sweep_layers(x, y, "regression", layers="sweep:-2--1", show_progress=False)
    assert sweep.layers_ == [2, 3] and sweep.best_layer() == 3
    assert sweep.scores_[1] > 0.9 and sweep.scores_[0] < 0.1
    assert sweep.predict(x, layer=3).shape == (300,)
    with pytest.raises(LOESError, match="not swept"):
        sweep.predict(x, layer=0)


def test_string_labels_and_errors(rng):
    y = np.array(["cat", "dog"] * 40)
    x = rng.normal(size=(80, 2, 4))
    x[:, 0, 0] += 3 * (y == "dog")
    sweep = LayerSweep(cv=4, show_progress=False).fit(x, y)
    assert set(sweep.predict(x)) <= {"cat", "dog"} and sweep.best_layer() == 0
    assert "accuracy" in sweep.table()
    with pytest.raises(LOESError, match="cv must be"):
        LayerSweep(cv=1).fit(x, y)
    with pytest.raises(LOESError, match="needs targets"):
        LayerSweep("label_free").fit(x, y)
    with pytest.raises(LOESError, match="not fitted"):
        LayerSweep().best_layer()


# ------------------------------------------------------- frame and plot
@pytest.fixture(scope="module")
def fitted_sweep():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 150)
    x = rng.normal(size=(150, 4, 6))
    x[:, 2, :3] += 2.0 * np.eye(3)[y]
    names = [f"hidden_states[{i + 1}]" for i in range(4)]
    return LayerSweep(cv=3, layers=[0, 2, 3], show_progress=False).fit(x, y, layer_names=names)


def test_sweep_frame_holds_the_sweeps_arrays(fitted_sweep):
    pytest.importorskip("pandas")
    sweep = fitted_sweep
    frame = sweep.to_frame()
    assert list(frame.index) == [0, 2, 3]
    assert list(frame["name"]) == ["hidden_states[1]", "hidden_states[3]", "hidden_states[4]"]
    np.testing.assert_array_equal(frame["score"].to_numpy(), sweep.scores_)
    np.testing.assert_array_equal(frame["std"].to_numpy(), sweep.fold_scores_.std(1))
    assert frame["importance"].to_dict() == sweep.importances()
    assert frame.attrs == {"metric": "accuracy", "baseline": sweep.baseline_, "cv": 3}
    # the one naming scheme in the text table: index, then the model's name
    assert "2 (hidden_states[3])" in sweep.table()


def test_sweep_plot_writes_a_png_with_one_point_per_layer(fitted_sweep, tmp_path):
    pytest.importorskip("matplotlib")
    sweep = fitted_sweep
    fig = sweep.plot(tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert len(fig.axes) == 1
    line = fig.axes[0].lines[0]
    np.testing.assert_array_equal(line.get_xdata(), sweep.layers_)
    np.testing.assert_allclose(line.get_ydata(), sweep.scores_)


def test_sweep_refuses_names_of_the_wrong_length():
    x = np.random.default_rng(0).normal(size=(30, 3, 4))
    with pytest.raises(LOESError, match="layer_names has 2 names for 3 layers"):
        LayerSweep(cv=3, show_progress=False).fit(x, np.arange(30) % 2, layer_names=["a", "b"])
