"""Pure numerical functions and the engine's fast paths against slow, obvious twins."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from loes._linalg import cka_matrix, sym_gram, triplets
from loes.core import (
    isotropy,
    linear_cka,
    reference_isotropy,
    ridge_gcv_residuals,
    ridge_loo_residuals,
    triangle_geometry,
)
from loes.core._robust import (
    LayerFactor,
    _gcv_residual,
    _GcvCache,
    _geometry,
    _loo_residual,
    _Projection,
    tri_inverse,
)


def _refit_loo(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """N separate ridge fits, each leaving one sample out (the definition of LOO)."""
    n = x.shape[0]
    out = np.empty_like(y)
    for i in range(n):
        mask = np.arange(n) != i
        xm, ym = x[mask].mean(0), y[mask].mean(0)
        xc, yc = x[mask] - xm, y[mask] - ym
        w = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ yc)
        out[i] = y[i] - ((x[i] - xm) @ w + ym)
    return out


@pytest.mark.parametrize("n,d", [(40, 8), (15, 30)])  # primal (N > D) and dual (N < D)
def test_ridge_loo_closed_form_equals_refits(rng, n, d):
    x = rng.normal(size=(n, d))
    y = rng.normal(size=(n, 2)) + x[:, :2]
    lam = 0.7
    fast = ridge_loo_residuals(x, y, reg=lam, relative=False).numpy()
    np.testing.assert_allclose(fast, _refit_loo(x, y, lam), rtol=1e-8, atol=1e-10)


def test_ridge_loo_relative_penalty_is_scale_free(rng):
    x = rng.normal(size=(30, 50))
    y = rng.normal(size=30)
    a = ridge_loo_residuals(x, y, reg=0.1).numpy()
    b = ridge_loo_residuals(1e3 * x, y, reg=0.1).numpy()
    np.testing.assert_allclose(a, b, rtol=1e-7)


def test_isotropy_matches_spectrum_formula_and_is_bounded(rng):
    x = rng.normal(size=(100, 20)) * np.linspace(0.1, 3, 20)
    lam = np.linalg.eigvalsh(np.cov(x.T, bias=True))
    r = min(100 - 1, 20)
    expected = lam.sum() ** 2 / (r * (lam**2).sum())
    assert isotropy(x) == pytest.approx(expected, rel=1e-9)
    # the bounded form is a monotone map of the reference's mean/std ratio
    iso_ref = lam.mean() / lam.std()
    assert isotropy(x) == pytest.approx(1 / (1 + 1 / iso_ref**2), rel=1e-6)
    # invariances: rotation and scale; bounds
    q = np.linalg.qr(rng.normal(size=(20, 20)))[0]
    assert isotropy(7.0 * x @ q) == pytest.approx(isotropy(x), rel=1e-9)
    assert 0.0 < isotropy(x) <= 1.0
    assert isotropy(np.zeros((10, 4))) == 0.0
    # isotropic noise is near the maximum; a rank-1 layer is at the minimum 1/r
    assert isotropy(rng.normal(size=(5000, 16))) > 0.98
    assert isotropy(np.outer(rng.normal(size=50), rng.normal(size=10))) == pytest.approx(
        1 / 10, rel=1e-6
    )


def test_reference_isotropy_is_unbounded_for_noise(rng):
    # flaw 1 of the published formula: isotropic noise scores far above 1
    assert reference_isotropy(rng.normal(size=(2000, 64))) > 4.0


def test_linear_cka_textbook_and_invariances(rng):
    x = rng.normal(size=(60, 10))
    y = x @ rng.normal(size=(10, 7)) + 0.5 * rng.normal(size=(60, 7))
    xc, yc = x - x.mean(0), y - y.mean(0)
    textbook = np.linalg.norm(yc.T @ xc) ** 2 / (
        np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)
    )
    assert linear_cka(x, y) == pytest.approx(textbook, rel=1e-10)
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x))
    q = np.linalg.qr(rng.normal(size=(10, 10)))[0]
    assert linear_cka(3.0 * x @ q, y) == pytest.approx(linear_cka(x, y), rel=1e-10)


def _hsic1(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012) unbiased HSIC, written out as in the paper."""
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    one = np.ones(n)
    return (
        np.trace(kt @ lt)
        + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * one @ kt @ lt @ one
    ) / (n * (n - 3))


def test_cka_matrix_matches_pairwise_twins(rng):
    layers = [rng.normal(size=(50, d)) for d in (6, 9, 6)]
    layers[2] = layers[0] @ rng.normal(size=(6, 6)) + 0.1 * rng.normal(size=(50, 6))
    t = [torch.from_numpy(a) for a in layers]
    biased = cka_matrix(t, torch.float64, debiased=False).numpy()
    for i, j in itertools.product(range(3), repeat=2):
        assert biased[i, j] == pytest.approx(linear_cka(layers[i], layers[j]), rel=1e-9, abs=1e-12)
    deb = cka_matrix(t, torch.float64, debiased=True).numpy()
    grams = [(a - a.mean(0)) @ (a - a.mean(0)).T for a in layers]
    for i, j in itertools.combinations(range(3), 2):
        expected = _hsic1(grams[i], grams[j]) / math.sqrt(
            _hsic1(grams[i], grams[i]) * _hsic1(grams[j], grams[j])
        )
        assert deb[i, j] == pytest.approx(min(max(expected, 0), 1), rel=1e-8, abs=1e-10)
    assert np.allclose(np.diag(deb), 1.0)


def test_debiased_cka_is_near_zero_for_independent_noise_when_n_below_d(rng):
    a, b = (torch.from_numpy(rng.normal(size=(64, 256))) for _ in range(2))
    biased = cka_matrix([a, b], torch.float64, debiased=False)[0, 1]
    deb = cka_matrix([a, b], torch.float64, debiased=True)[0, 1]
    assert biased > 0.5  # plain linear CKA is biased towards 1 at N < D
    assert deb < 0.05


def test_triangle_geometry_matches_explicit_loop_and_gram_form(rng):
    cent = rng.normal(size=(6, 5))
    idx = triplets(6)
    assert idx.shape == (20, 3)
    c = cent - cent.mean(0)
    areas = []
    for a, b, d in itertools.combinations(range(6), 3):
        ab, ac = c[b] - c[a], c[d] - c[a]
        areas.append(0.5 * math.sqrt(max((ab @ ab) * (ac @ ac) - (ab @ ac) ** 2, 0)))
    expected = np.mean(areas) / np.mean((c**2).sum(1))
    t = torch.from_numpy(cent)
    assert triangle_geometry(t, idx) == pytest.approx(expected, rel=1e-10)
    assert _geometry(t, idx) == pytest.approx(expected, rel=1e-9)
    # scale-free
    assert _geometry(1e4 * t, idx) == pytest.approx(expected, rel=1e-9)


def test_triplets_sampled_above_twenty_classes_are_seeded_and_distinct():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = triplets(30, generator=g1), triplets(30, generator=g2)
    assert torch.equal(a, b)
    assert bool(
        (a[:, 0] != a[:, 1]).all() and (a[:, 1] != a[:, 2]).all() and (a[:, 0] != a[:, 2]).all()
    )


@pytest.mark.parametrize(
    "n,d,dual", [(40, 12, False), (40, 12, True), (20, 35, True), (20, 35, False)]
)
def test_layer_factor_hat_diagonal_and_step1_loo(rng, n, d, dual):
    x = torch.from_numpy(rng.normal(size=(n, d)))
    y = torch.from_numpy(rng.normal(size=(n, 3)))
    y = y - y.mean(0)
    f = LayerFactor(x, 0.1, torch.float64, dual=dual)
    loo = _loo_residual(f, y, y, None, torch.float64, want_xt=False).residual()
    expected = ridge_loo_residuals(x, y, reg=0.1)
    torch.testing.assert_close(loo, expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(
    "n,d,dual", [(50, 10, False), (50, 10, True), (25, 40, True), (25, 40, False)]
)
def test_woodbury_orthogonalised_loo_equals_explicit_projection(rng, n, d, dual):
    """The candidate's fit after projecting out P = U W Uᵀ, against forming T X explicitly."""
    x = torch.from_numpy(rng.normal(size=(n, d)))
    sel = torch.from_numpy(rng.normal(size=(n, 6)))
    sel = sel - sel.mean(0)
    y = torch.from_numpy(rng.normal(size=(n, 2)))
    y = y - y.mean(0)
    u, s, _ = torch.linalg.svd(sel, full_matrices=False)
    proj = _Projection([u * s], 6, n, orth_reg=1.0, cdt=torch.float64)
    assert proj.rank >= 1
    f = LayerFactor(x, 0.1, torch.float64, dual=dual)
    tr = proj.t(y)
    fit = _loo_residual(f, y, tr, proj, torch.float64, want_xt=True)
    fast, xt_u = fit.residual(), fit.xt_u
    # slow twin: explicit T, explicit orthogonalised features, explicit hat matrix
    t_mat = torch.eye(n, dtype=torch.float64) - proj.u @ torch.diag(proj.w) @ proj.u.T
    xt = t_mat @ (x - x.mean(0))
    hat = xt @ torch.linalg.solve(xt.T @ xt + f.lam * torch.eye(d, dtype=torch.float64), xt.T)
    hat = hat + 1.0 / n
    e = y - (hat - 1.0 / n) @ y
    slow = e / (1 - torch.diagonal(hat))[:, None]
    torch.testing.assert_close(fast, slow, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(xt_u, (x - x.mean(0)).T @ proj.u, rtol=1e-9, atol=1e-9)


def test_gcv_equals_refit_loo_when_every_sample_has_the_same_leverage(rng):
    """GCV replaces each 1 − H_ii by their mean: exact when all leverages are equal.

    Cosine/sine pairs over equally spaced points give every row the same norm
    and orthogonal centred columns, hence equal leverages.
    """
    n = 24
    t = 2 * np.pi * np.arange(n) / n
    x = np.stack([f(j * t) for j in (1, 2, 3) for f in (np.cos, np.sin)], axis=1)
    y = rng.normal(size=(n, 2)) + x[:, :2]
    lam = 0.5
    gcv = ridge_gcv_residuals(x, y, reg=lam, relative=False).numpy()
    np.testing.assert_allclose(gcv, _refit_loo(x, y, lam), rtol=1e-8, atol=1e-10)


def test_gcv_trace_matches_the_spectrum(rng):
    """tr H = Σ σ²/(σ² + lam) over the centred singular values."""
    x = rng.normal(size=(30, 8))
    y = rng.normal(size=(30, 1))
    lam = 2.0
    res = ridge_gcv_residuals(x, y, reg=lam, relative=False).numpy()
    xc, yc = x - x.mean(0), y - y.mean(0)
    s = np.linalg.svd(xc, compute_uv=False)
    dof = float((s**2 / (s**2 + lam)).sum())
    e = yc - xc @ np.linalg.solve(xc.T @ xc + lam * np.eye(8), xc.T @ yc)
    np.testing.assert_allclose(res, e / (1 - (1 + dof) / 30), rtol=1e-10)


@pytest.mark.parametrize("n", [5, 130, 300])
def test_recursive_triangular_inverse_equals_solve(rng, n):
    a = rng.normal(size=(n, n))
    chol = torch.linalg.cholesky(torch.from_numpy(a @ a.T + n * np.eye(n)))
    expected = torch.linalg.solve_triangular(chol, torch.eye(n, dtype=torch.float64), upper=False)
    torch.testing.assert_close(tri_inverse(chol, base=32), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "n,d,dual", [(40, 12, False), (40, 12, True), (20, 35, True), (20, 35, False)]
)
def test_layer_factor_gcv_step1_equals_plain_twin(rng, n, d, dual):
    x = torch.from_numpy(rng.normal(size=(n, d)))
    y = torch.from_numpy(rng.normal(size=(n, 3)))
    y = y - y.mean(0)
    f = LayerFactor(x, 0.1, torch.float64, dual=dual, cv="gcv")
    res = _gcv_residual(f, y, y, None, torch.float64, want_xt=False).residual()
    torch.testing.assert_close(res, ridge_gcv_residuals(x, y, reg=0.1), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(
    "n,d,dual", [(50, 10, False), (50, 10, True), (25, 40, True), (25, 40, False)]
)
def test_orthogonalised_gcv_equals_explicit_projection_over_growing_blocks(rng, n, d, dual):
    """Cached small-matrix GCV after projecting out P = U W Uᵀ, against forming T X
    and its hat matrix explicitly; the projection grows by a second block as in
    a later step, so the cache's incremental update is exercised."""
    x = torch.from_numpy(rng.normal(size=(n, d)))
    y = torch.from_numpy(rng.normal(size=(n, 2)))
    y = y - y.mean(0)
    f = LayerFactor(x, 0.1, torch.float64, dual=dual, cv="gcv")
    cache = _GcvCache()
    blocks = []
    for width in (4, 3):
        sel = torch.from_numpy(rng.normal(size=(n, width)))
        u, s, _ = torch.linalg.svd(sel - sel.mean(0), full_matrices=False)
        blocks.append(u * s)
        proj = _Projection(list(blocks), 6 * len(blocks), n, orth_reg=1.0, cdt=torch.float64)
        assert proj.rank >= 1
        tr = proj.t(y)
        fit = _gcv_residual(f, y, tr, proj, torch.float64, want_xt=True, cache=cache)
        assert fit.sq == pytest.approx(float((fit.residual() ** 2).sum()), rel=1e-9)
        fast, xt_u = fit.residual(), fit.xt_u
        t_mat = torch.eye(n, dtype=torch.float64) - proj.u @ torch.diag(proj.w) @ proj.u.T
        xt = t_mat @ (x - x.mean(0))
        hat = xt @ torch.linalg.solve(xt.T @ xt + f.lam * torch.eye(d, dtype=torch.float64), xt.T)
        slow = (y - hat @ y) / (1 - (1 + torch.trace(hat)) / n)
        torch.testing.assert_close(fast, slow, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(xt_u, (x - x.mean(0)).T @ proj.u, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("n,d", [(50, 7), (40, 300), (700, 9)])
def test_blocked_symmetric_gram_equals_plain_products(rng, n, d):
    x = torch.from_numpy(rng.normal(size=(n, d)))
    torch.testing.assert_close(sym_gram(x, base=16), x.T @ x, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(sym_gram(x, rows=True, base=16), x @ x.T, rtol=1e-12, atol=1e-10)
