"""loes._linalg, the one home of each numerical concept, against slow, obviously correct twins."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from loes import LOESError, select_layers_from_custom_embeddings
from loes._linalg import (
    LayerStandardizer,
    RidgePath,
    cka_matrix,
    column_stats,
    linear_cka,
    masked_mean,
    relative_penalty,
    triangle_areas,
    triangle_geometry,
    triplets,
)
from loes.metrics import cka_matrix as metrics_cka_matrix
from loes.report import cka_heatmap_matrix
from loes.transfer import triangle_log_area


@pytest.fixture
def rng():
    return np.random.default_rng(11)


# ------------------------------------------------------------------- ridge
def _fit(x, y, lam):
    """Textbook ridge with an unpenalised intercept: the normal equations on centred data."""
    xm, ym = x.mean(0), y.mean(0)
    w = np.linalg.solve((x - xm).T @ (x - xm) + lam * np.eye(x.shape[1]), (x - xm).T @ (y - ym))
    return w, ym - xm @ w


def _lam(x, reg):
    xc = x - x.mean(0)
    return reg * np.trace(xc.T @ xc) / min(x.shape[0] - 1, x.shape[1])


@pytest.mark.parametrize("n,d", [(40, 6), (15, 30)])  # primal and N < D
def test_ridge_path_loo_equals_n_explicit_refits(rng, n, d):
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, 2))
    path = RidgePath(torch.from_numpy(x), torch.from_numpy(y))
    for reg in (1e-3, 0.1, 10.0):
        lam = _lam(x, reg)  # the penalty of the full data, as in the hat-matrix form
        slow = np.empty_like(y)
        for i in range(n):
            keep = np.arange(n) != i
            w, b = _fit(x[keep], y[keep], lam)
            slow[i] = y[i] - (x[i] @ w + b)
        np.testing.assert_allclose(path.loo_residuals(reg).numpy(), slow, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("n,d", [(40, 6), (15, 30)])
def test_ridge_path_gcv_weights_and_predictions_equal_the_hat_matrix(rng, n, d):
    x, y, xv = rng.normal(size=(n, d)), rng.normal(size=(n, 3)), rng.normal(size=(7, d))
    path = RidgePath(torch.from_numpy(x), torch.from_numpy(y))
    xc, yc = x - x.mean(0), y - y.mean(0)
    for reg in (1e-2, 1.0):
        lam = _lam(x, reg)
        assert path.penalty(reg) == pytest.approx(lam, rel=1e-12)
        h = xc @ np.linalg.solve(xc.T @ xc + lam * np.eye(d), xc.T)
        e = yc - h @ yc
        np.testing.assert_allclose(path.residuals(reg).numpy(), e, rtol=1e-8, atol=1e-10)
        gcv = e / (1.0 - (1.0 + np.trace(h)) / n)  # the intercept counted in tr H
        np.testing.assert_allclose(path.gcv_residuals(reg).numpy(), gcv, rtol=1e-8, atol=1e-10)
        w, b = _fit(x, y, lam)
        got_w, got_b = path.coef(reg)
        np.testing.assert_allclose(got_w.numpy(), w, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(got_b.numpy(), b, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(
            path.predict(reg, torch.from_numpy(xv)).numpy(), xv @ w + b, rtol=1e-8, atol=1e-10
        )


def test_ridge_path_kernel_form_equals_feature_form(rng):
    x, y = rng.normal(size=(25, 40)), rng.normal(size=(25, 2))
    xc = x - x.mean(0)
    a = RidgePath(torch.from_numpy(x), torch.from_numpy(y))
    b = RidgePath(y=torch.from_numpy(y), kernel=torch.from_numpy(xc @ xc.T), dim=40)
    for reg in (1e-3, 0.3):
        np.testing.assert_allclose(
            b.loo_residuals(reg).numpy(), a.loo_residuals(reg).numpy(), rtol=1e-7, atol=1e-9
        )
        np.testing.assert_allclose(
            b.gcv_residuals(reg).numpy(), a.gcv_residuals(reg).numpy(), rtol=1e-7, atol=1e-9
        )


def test_relative_ridge_is_scale_free_and_absolute_is_not(rng):
    x, y = rng.normal(size=(30, 5)), rng.normal(size=30)
    ref = RidgePath(x, y).loo_residuals(0.1).numpy()
    np.testing.assert_allclose(RidgePath(1e6 * x, y).loo_residuals(0.1).numpy(), ref, rtol=1e-8)
    assert relative_penalty(0.1, 50.0, 30, 5) == pytest.approx(1.0)  # 0.1 · 50 / min(29, 5)
    absolute = RidgePath(1e6 * x, y, relative=False).loo_residuals(0.1).numpy()
    assert not np.allclose(absolute, ref, rtol=1e-3)


def test_ridge_path_on_a_constant_layer_predicts_the_mean():
    x = torch.full((10, 3), 2.5, dtype=torch.float64)
    y = torch.arange(10, dtype=torch.float64)
    path = RidgePath(x, y)
    assert path.trace == 0.0
    w, b = path.coef(0.1)
    assert torch.all(w == 0) and float(b) == pytest.approx(4.5)
    loo = path.loo_residuals(0.1)[:, 0]
    torch.testing.assert_close(loo, (y - 4.5) / (1 - 1 / 10))  # the mean of the other nine


# ------------------------------------------------------------ standardiser
def test_column_stats_is_ddof0_and_zeroes_constant_features(rng):
    x = rng.normal(size=(50, 4)) * [1.0, 1e-8, 1e8, 1.0]
    x[:, 3] = 0.1  # centres to ±1 ulp, not to exact zeros
    x = np.concatenate([x, np.full((50, 1), 1e5)], axis=1)
    mean, inv = column_stats(torch.from_numpy(x))
    np.testing.assert_allclose(mean.numpy()[0], x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(inv.numpy()[0, :3], 1.0 / x[:, :3].std(0), rtol=1e-10)
    assert inv[0, 3] == 0 and inv[0, 4] == 0


def test_layer_standardizer_gives_each_layer_unit_total_variance_whatever_its_scale(rng):
    layers = [torch.from_numpy(rng.normal(size=(40, d)) * s) for d, s in ((3, 1e-6), (8, 1e6))]
    z = LayerStandardizer().fit(layers).transform(layers)
    assert float(z[:, :3].var(0, unbiased=False).sum()) == pytest.approx(1.0)
    assert float(z[:, 3:].var(0, unbiased=False).sum()) == pytest.approx(1.0)
    with pytest.raises(LOESError, match="expected 2 layers; got 1"):
        LayerStandardizer().fit(layers).transform(layers[:1])


# ---------------------------------------------------------------------- CKA
def _hsic(k, l, debiased):
    n = k.shape[0]
    if not debiased:
        return (k * l).sum()
    kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    one = np.ones(n)
    return (
        np.trace(kt @ lt)
        + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * one @ kt @ lt @ one
    )


def _textbook_cka(a, b, debiased):
    k, l = ((v - v.mean(0)) @ (v - v.mean(0)).T for v in (a, b))
    return _hsic(k, l, debiased) / math.sqrt(_hsic(k, k, debiased) * _hsic(l, l, debiased))


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("method", ["gram", "feature", "auto"])
def test_cka_matrix_forms_equal_the_textbook_formula(rng, debiased, method):
    layers = [rng.normal(size=(30, d)) for d in (4, 50, 7)]
    layers[2] = layers[0] @ rng.normal(size=(4, 7)) + 0.2 * rng.normal(size=(30, 7))
    got = cka_matrix(
        [torch.from_numpy(a) for a in layers], debiased=debiased, method=method
    ).numpy()
    for i, j in itertools.product(range(3), repeat=2):
        want = min(max(_textbook_cka(layers[i], layers[j], debiased), 0.0), 1.0)
        assert got[i, j] == pytest.approx(want, rel=1e-8, abs=1e-10)
        assert linear_cka(layers[i], layers[j], debiased=debiased) == pytest.approx(
            want, rel=1e-8, abs=1e-10
        )


def test_biased_and_debiased_cka_differ_on_noise_at_n_below_d(rng):
    a, b = rng.normal(size=(40, 200)), rng.normal(size=(40, 200))
    assert linear_cka(a, b) > 0.5 > 0.05 > abs(linear_cka(a, b, debiased=True))


def test_cka_sampling_rule_is_a_seeded_randperm_of_rows(rng):
    layers = [torch.from_numpy(rng.normal(size=(90, d))) for d in (5, 6)]
    got = cka_matrix(layers, max_samples=40, generator=torch.Generator().manual_seed(3))
    rows = torch.randperm(90, generator=torch.Generator().manual_seed(3))[:40]
    torch.testing.assert_close(got, cka_matrix([x[rows] for x in layers]))


def test_metrics_and_report_use_the_same_cka(rng):
    x = rng.normal(size=(60, 4, 9))
    layers = [torch.from_numpy(x[:, i]) for i in range(4)]
    torch.testing.assert_close(
        metrics_cka_matrix(x), cka_matrix(layers, debiased=False), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(
        metrics_cka_matrix(x, debiased=True), cka_matrix(layers), rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(
        cka_heatmap_matrix(x), cka_matrix(layers).numpy(), rtol=1e-12, atol=1e-12
    )


def test_report_heatmap_is_the_redundancy_the_selector_saw(rng):
    """Above cka_samples rows both subsample the same rows (issue 10: the figure shows
    the selector's quantity)."""
    n = 700
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 5, 12))
    x[:, 2, :3] += 2 * np.eye(3)[y]
    x[:, 3] = x[:, 2] @ rng.normal(size=(12, 12)) + 0.3 * rng.normal(size=(n, 12))
    res = select_layers_from_custom_embeddings(x, y, 2, show_progress=False)
    heat = cka_heatmap_matrix(x)
    step = res.steps[1]
    want = [heat[c, res.selected_layers[0]] for c in step.candidates]
    np.testing.assert_allclose(step.terms["redundancy"], want, rtol=1e-6, atol=1e-9)
    assert max(want) > 0.5  # layer 3 is a noisy rotation of the first pick


# --------------------------------------------------------------- triangles
def _heron(p, q, r):
    a, b, c = np.linalg.norm(q - r), np.linalg.norm(p - r), np.linalg.norm(p - q)
    s = (a + b + c) / 2
    return math.sqrt(max(s * (s - a) * (s - b) * (s - c), 0.0))


def test_triangle_areas_equal_heron_in_a_loop(rng):
    pts = rng.normal(size=(3, 12, 5))
    got = triangle_areas(*(torch.from_numpy(p) for p in pts)).numpy()
    want = [_heron(pts[0, t], pts[1, t], pts[2, t]) for t in range(12)]
    np.testing.assert_allclose(got, want, rtol=1e-9)
    line = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    assert float(triangle_areas(line[0], line[1], line[2])) == 0.0
    assert float(triangle_areas(line[0], line[1], line[2], eps=1e-4)) == pytest.approx(0.5e-4)


def test_georeg_and_selector_triangles_use_the_same_area(rng):
    f = torch.from_numpy(rng.normal(size=(30, 4)))
    labels = torch.arange(30) % 3
    cents = np.stack([f[labels == c].mean(0).numpy() for c in range(3)])
    area = _heron(*cents)
    assert float(triangle_log_area(f, labels, torch.tensor([0, 1, 2]), eps=0.0)) == pytest.approx(
        math.log(area)
    )
    got = triangle_geometry(torch.from_numpy(cents), triplets(3), normalize=False)
    assert got == pytest.approx(area, rel=1e-10)


# -------------------------------------------------------------- masked mean
def test_masked_mean_equals_a_loop_and_ignores_nan_padding(rng):
    x = torch.from_numpy(rng.normal(size=(4, 6, 3)))
    mask = torch.tensor(
        [[1, 1, 1, 0, 0, 0], [1] * 6, [0] * 6, [0, 0, 1, 1, 0, 0]], dtype=torch.bool
    )
    x[~mask] = float("nan")
    got = masked_mean(x, mask)
    for b in range(4):
        rows = [x[b, t] for t in range(6) if mask[b, t]]
        want = torch.stack(rows).mean(0) if rows else torch.zeros(3, dtype=x.dtype)
        torch.testing.assert_close(got[b], want)
    assert masked_mean(x.float(), mask, dtype=torch.float64).dtype == torch.float64
    torch.testing.assert_close(masked_mean(x[:2, :3]), x[:2, :3].mean(1))


def test_masked_mean_keeps_gradients():
    x = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    masked_mean(x, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])).sum().backward()
    torch.testing.assert_close(x.grad[0, :, 0], torch.tensor([0.5, 0.5, 0.0, 0.0]))
