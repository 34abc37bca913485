"""Layer specifications and the group-lasso layer selector."""

import numpy as np
import pytest

from loes import LOESError, select_layers_from_custom_embeddings
from loes.layers import GroupLassoLayers, _block_soft_threshold, infer_task, resolve_layers


@pytest.fixture
def rng():
    return np.random.default_rng(11)


@pytest.mark.parametrize(
    "spec, expected",
    [
        (3, [3]),
        (-1, [11]),
        (-12, [0]),
        ([0, -1, 5], [0, 11, 5]),
        (range(2, 5), [2, 3, 4]),
        ("first", [0]),
        ("middle", [6]),
        ("last", [11]),
        ("all", list(range(12))),
        ("sweep", list(range(12))),
        ("sweep:4", [0, 4, 8]),
        ("sweep:5", [0, 5, 10]),
        ("sweep:2-5", [2, 3, 4, 5]),
        ("sweep:-3--1", [9, 10, 11]),
        ("sweep:3--3", list(range(3, 10))),
        ("-2", [10]),
        ("1, 4,-1", [1, 4, 11]),
        (" LAST ", [11]),
        (np.int64(2), [2]),
    ],
)
def test_static_specs(spec, expected):
    assert resolve_layers(spec, 12) == expected


@pytest.mark.parametrize(
    "spec, match",
    [
        (12, "out of range"),
        (-13, "out of range"),
        ([1, 1], "more than once"),
        ([], "empty"),
        (True, "bool"),
        ([1.5], "integers"),
        ("sweep:0", "step must be >= 1"),
        ("sweep:5-2", "empty"),
        ("sweep:x", "malformed"),
        ("penultimate", "unknown layer spec"),
        (2.0, "must be an int"),
        ("loes", "needs embeddings"),
    ],
)
def test_bad_specs_raise(spec, match):
    with pytest.raises(LOESError, match=match):
        resolve_layers(spec, 12)


def test_middle_of_odd_and_even_depth():
    assert resolve_layers("middle", 7) == [3] and resolve_layers("middle", 1) == [0]


def test_infer_task():
    assert infer_task(np.array([0, 1, 2])) == "classification"
    assert infer_task(np.array(["a", "b"])) == "classification"
    assert infer_task(np.array([0.5, 1.2])) == "regression"
    assert infer_task(np.eye(3)) == "classification"


def test_loes_spec_is_the_core_selector(rng):
    y = rng.integers(0, 3, 120)
    x = rng.normal(size=(120, 5, 6))
    x[:, 1, :3] += 2 * np.eye(3)[y]
    got = resolve_layers("loes", 5, embeddings=x, targets=y, k=2, preset="reference")
    ref = select_layers_from_custom_embeddings(x, y, 2, preset="reference", show_progress=False)
    assert got == ref.selected_layers
    free = resolve_layers("loes", 5, embeddings=x, k=2, preset="reference")
    ref_free = select_layers_from_custom_embeddings(
        x, None, 2, task="label_free", preset="reference", show_progress=False
    )
    assert free == ref_free.selected_layers


# ---------------------------------------------------------------- group lasso
def planted_classification(rng, n=300):
    y = rng.integers(0, 4, n)
    x = rng.normal(size=(n, 8, 12))
    x[:, 2, :4] += 1.5 * np.eye(4)[y]
    x[:, 5, 4:8] += 1.0 * np.eye(4)[y]
    return x, y


def planted_regression(rng, n=300):
    x = rng.normal(size=(n, 8, 12))
    y = 2 * x[:, 1, 0] + x[:, 6, 3] - x[:, 6, 5] + 0.3 * rng.normal(size=n)
    return x, y


def test_auto_recovers_planted_layers_multiclass(rng):
    x, y = planted_classification(rng)
    model = GroupLassoLayers(cv=4).fit(x, y)
    assert set(model.selected_layers_[:2]) == {2, 5}
    noise = [i for i in range(8) if i not in (2, 5)]
    assert model.block_norms_[noise].max() < 0.2 * model.block_norms_[[2, 5]].min()
    assert (
        resolve_layers("auto", 8, embeddings=x, targets=y, k=2, cv=4) == model.selected_layers_[:2]
    )
    assert set(resolve_layers("fast_auto", 8, embeddings=x, targets=y, k=2)) == {2, 5}


def test_auto_recovers_planted_layers_regression(rng):
    x, y = planted_regression(rng)
    model = GroupLassoLayers(cv=4).fit(x, y)
    assert model.task_ == "regression"
    assert set(model.selected_layers_[:2]) == {1, 6}
    noise = [i for i in range(8) if i not in (1, 6)]
    assert model.block_norms_[noise].max() < 0.1 * model.block_norms_[[1, 6]].min()
    assert set(resolve_layers("fast_auto", 8, embeddings=x, targets=y, k=2)) == {1, 6}
    # one-SE rule keeps no more layers than the minimum-loss λ
    loose = GroupLassoLayers(cv=4, rule="min").fit(x, y)
    assert loose.lambda_ <= model.lambda_
    assert len(loose.selected_layers_) >= len(model.selected_layers_)


def test_path_starts_empty_and_cv_loss_has_an_interior_minimum(rng):
    x, y = planted_classification(rng)
    model = GroupLassoLayers(cv=3, n_lambdas=12).fit(x, y)
    assert np.all(model.path_norms_[0] == 0)  # λ_max switches every layer off
    assert np.all(np.diff(model.lambdas_) < 0)
    assert (model.path_norms_[-1] > 0).sum() >= 2
    assert model.cv_loss_[model.best_index_] < model.cv_loss_[0]


def test_singleton_groups_match_sklearn_lasso(rng):
    from sklearn.linear_model import Lasso

    x = rng.normal(size=(150, 6, 1)) * np.array([1, 2, 0.5, 1, 3, 1])[None, :, None]
    y = 1.5 * x[:, 0, 0] - 0.7 * x[:, 3, 0] + 0.5 * rng.normal(size=150)
    model = GroupLassoLayers("regression", cv=None, n_lambdas=8, max_iter=20000, tol=1e-10).fit(
        x, y
    )
    z = (x[:, :, 0] - x[:, :, 0].mean(0)) / x[:, :, 0].std(0)
    ys = (y - y.mean()) / y.std()
    ref = Lasso(alpha=model.lambda_, tol=1e-12, max_iter=100000).fit(z, ys)
    np.testing.assert_allclose(model.coef_[:, 0], ref.coef_, rtol=1e-5, atol=1e-7)


def test_multinomial_solution_satisfies_kkt(rng):
    x, y = planted_classification(rng, n=200)
    model = GroupLassoLayers(cv=None, n_lambdas=6, lambda_min_ratio=0.05, max_iter=20000, tol=1e-11)
    model.fit(x, y)
    xs, ys, groups, _ = model._prepare(x, y)
    grad, grad_b = model._gradient(xs, ys, model.coef_, model.intercept_)
    lam = model.lambda_
    np.testing.assert_allclose(grad_b, 0, atol=1e-6)
    for a, b in groups:
        w, g = model.coef_[a:b], grad[a:b]
        if np.linalg.norm(w) == 0:
            assert np.linalg.norm(g) <= lam * (1 + 1e-6)
        else:  # stationarity: g = -lam * w / ||w||
            np.testing.assert_allclose(g, -lam * w / np.linalg.norm(w), atol=1e-5 * lam)


def test_block_soft_threshold_matches_definition(rng):
    w = rng.normal(size=(7, 3))
    group_id = np.array([0, 0, 1, 1, 1, 2, 2])
    out = _block_soft_threshold(w, 1.2, group_id, 3)
    for g in range(3):
        block = w[group_id == g]
        norm = np.linalg.norm(block)
        expected = max(0.0, 1 - 1.2 / norm) * block
        np.testing.assert_allclose(out[group_id == g], expected, rtol=1e-12)


def test_fast_auto_refits_on_chosen_layers(rng):
    x, y = planted_regression(rng)
    model = GroupLassoLayers(cv=None).fit_top_k(x, y, 3)
    assert len(model.selected_layers_) == 3 and {1, 6} <= set(model.selected_layers_)
    assert model.refit_layers_ == sorted(model.selected_layers_)
    assert model.refit_coef_.shape == (3 * 12, 1)


def test_auto_errors(rng):
    x, y = planted_regression(rng)
    with pytest.raises(LOESError, match="needs targets"):
        resolve_layers("auto", 8, embeddings=x)
    with pytest.raises(LOESError, match="8 layers but n_layers=6"):
        resolve_layers("fast_auto", 6, embeddings=x, targets=y)
    with pytest.raises(LOESError, match="rule"):
        GroupLassoLayers(rule="best")


def test_fast_auto_warns_when_the_path_is_too_short(rng):
    from loes import LOESWarning

    x, y = planted_regression(rng)
    with pytest.warns(LOESWarning, match="enter the group-lasso path"):
        GroupLassoLayers(cv=None, n_lambdas=3, lambda_min_ratio=0.5).fit_top_k(x, y, 5)
