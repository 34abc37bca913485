"""Pure functions for each quantity LOES uses.

Each takes plain (n_samples, dim) tensors or arrays and is simple enough to be
checked against a textbook formula in the tests. The engines in ``_robust`` and
``_reference`` compute the same quantities in batched, cached form.
"""

from __future__ import annotations

import itertools
from typing import Any, Optional

import numpy as np
import torch

__all__ = [
    "as_float",
    "center",
    "gram",
    "isotropy",
    "linear_cka",
    "reference_isotropy",
    "ridge_gcv_residuals",
    "ridge_loo_residuals",
    "ridge_fit",
    "triangle_geometry",
    "triplets",
]


def as_float(x: Any, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A tensor in ``dtype`` (fp16/bf16 and integer inputs are upcast)."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    return x.to(dtype)


def center(x: torch.Tensor) -> torch.Tensor:
    """Subtract the column means."""
    return x - x.mean(dim=0, keepdim=True)


def gram(xc: torch.Tensor) -> torch.Tensor:
    """The smaller Gram matrix of a centred (N, D) matrix: XᵀX (D <= N) or XXᵀ (N < D).

    Both have the same non-zero eigenvalues, so spectral quantities can use
    whichever is cheaper.
    """
    n, d = xc.shape
    return xc.T @ xc if d <= n else xc @ xc.T


# ----------------------------------------------------------------- isotropy
def isotropy(x: Any) -> float:
    """Bounded isotropy in [0, 1] of the covariance spectrum of ``x`` (N, D).

    The normalised participation ratio ``(Σλ)² / (r · Σλ²)`` with
    ``r = min(N - 1, D)`` the largest possible rank. It is 1 when all r
    eigenvalues are equal (isotropic) and 1/r when one direction holds all the
    variance. It equals ``1 / (1 + 1/iso²)`` for the reference's mean/std
    isotropy computed over r eigenvalues, so it ranks layers the same way but
    cannot exceed 1. Scale- and rotation-invariant. A constant layer
    (zero variance) returns 0.
    """
    xc = center(as_float(x))
    g = gram(xc)
    tr = torch.diagonal(g).sum()
    if float(tr) <= 0:
        return 0.0
    r = min(xc.shape[0] - 1, xc.shape[1])
    return float(tr**2 / (r * (g * g).sum()))


def reference_isotropy(x: Any, eps: float = 1e-6) -> float:
    """The published isotropy: mean(λ) / (std(λ) + eps) of the covariance spectrum.

    For D <= 512 the eigenvalues of ``XcᵀXc/N + eps·I`` (D values); for D > 512
    the squared singular values of Xc over N (min(N, D) values); each clamped at
    ``eps``. Unbounded above (see the spec's flaw 1) and discontinuous at D = 512.
    """
    xc = center(as_float(x))
    n, d = xc.shape
    if d > 512:
        lam = torch.linalg.eigvalsh(gram(xc) / max(n, 1))
    else:
        cov = xc.T @ xc / max(n, 1) + eps * torch.eye(d, dtype=xc.dtype, device=xc.device)
        lam = torch.linalg.eigvalsh(cov)
    lam = lam.clamp(min=eps)
    return float(lam.mean() / (lam.std(unbiased=False) + eps))


# -------------------------------------------------------------------- ridge
def ridge_fit(x: torch.Tensor, y: torch.Tensor, lam: float):
    """Primal ridge with an unpenalised intercept: returns (W, b).

    ``W = (XcᵀXc + lam·I)⁻¹ XcᵀYc``, ``b = ȳ − x̄W``.
    """
    xm, ym = x.mean(0, keepdim=True), y.mean(0, keepdim=True)
    xc, yc = x - xm, y - ym
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    w = torch.linalg.solve(xc.T @ xc + lam * eye, xc.T @ yc)
    return w, (ym - xm @ w).squeeze(0)


def _centred_pair(x: Any, y: Any):
    """Centred float64 features (N, D) and targets (N, m) for the ridge twins."""
    x, y = as_float(x), as_float(y)
    if y.ndim == 1:
        y = y[:, None]
    return center(x), y - y.mean(0, keepdim=True)


def ridge_loo_residuals(x: Any, y: Any, reg: float = 1e-2, relative: bool = True) -> torch.Tensor:
    """Exact leave-one-out residuals of ridge regression with an intercept.

    Parameters
    ----------
    x : (N, D) features; y : (N,) or (N, m) targets.
    reg : ridge strength. With ``relative=True`` (the default) the penalty is
        ``reg · tr(XcᵀXc) / r`` with ``r = min(N - 1, D)``: ``reg`` times the mean
        non-zero eigenvalue, so the fit does not depend on the scale of ``x``.

    Returns
    -------
    (N, m) tensor: ``y_i − ŷ_{−i}(x_i)`` where ``ŷ_{−i}`` is refitted without
    sample i. Uses the hat-matrix identity ``e_i / (1 − H_ii)``, which is exact
    for ridge with an unpenalised intercept; the dual (N × N) form is used when
    N < D.
    """
    xc, yc = _centred_pair(x, y)
    n, d = xc.shape
    g = gram(xc)
    lam = reg
    if relative:
        r = min(n - 1, d)
        lam = reg * float(torch.diagonal(g).sum()) / r
    eye_n = torch.eye(n, dtype=xc.dtype, device=xc.device)
    if d <= n:
        a = g + lam * torch.eye(d, dtype=xc.dtype, device=xc.device)
        h = xc @ torch.linalg.solve(a, xc.T)
    else:
        h = g @ torch.linalg.inv(g + lam * eye_n)
    h = h + 1.0 / n  # the intercept's share of the hat matrix
    e = yc - (h - 1.0 / n) @ yc
    return e / (1.0 - torch.diagonal(h))[:, None]


def ridge_gcv_residuals(x: Any, y: Any, reg: float = 1e-2, relative: bool = True) -> torch.Tensor:
    """Generalised cross-validation (GCV) residuals of ridge regression with an intercept.

    Same probe and penalty as :func:`ridge_loo_residuals`, but every in-sample
    residual is divided by the mean of ``1 − H_ii`` (intercept included),
    ``1 − (1 + tr H)/N``, instead of its own ``1 − H_ii``. The mean square of
    these residuals is the GCV estimate of the out-of-sample error (Golub,
    Heath and Wahba, 1979): a rotation-invariant version of leave-one-out that
    needs only the trace of the hat matrix. Written out in full (explicit hat
    matrix) as the plain twin of the engine's factorised form.
    """
    xc, yc = _centred_pair(x, y)
    n, d = xc.shape
    lam = reg
    if relative:
        lam = reg * float((xc * xc).sum()) / min(n - 1, d)
    h = xc @ torch.linalg.solve(xc.T @ xc + lam * torch.eye(d, dtype=xc.dtype, device=xc.device), xc.T)
    e = yc - h @ yc
    return e / (1.0 - (1.0 + torch.trace(h)) / n)


# ---------------------------------------------------------------------- CKA
def linear_cka(x: Any, y: Any) -> float:
    """Linear centred kernel alignment between two representations of the same samples.

    ``‖YcᵀXc‖²_F / (‖XcᵀXc‖_F ‖YcᵀYc‖_F)`` in [0, 1]: 1 for representations
    equal up to rotation and isotropic scale, 0 for orthogonal ones. 0 when
    either is constant.
    """
    xc, yc = center(as_float(x)), center(as_float(y))
    kx, ky = xc @ xc.T, yc @ yc.T
    den = torch.linalg.norm(kx) * torch.linalg.norm(ky)
    if float(den) == 0.0:
        return 0.0
    return float((kx * ky).sum() / den)


# ------------------------------------------------------------ class geometry
def triplets(
    n_classes: int, max_exhaustive: int = 20, n_samples: int = 1140, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Index triplets of distinct classes: all of them when ``n_classes <=
    max_exhaustive``, else ``n_samples`` drawn with ``generator``."""
    if n_classes < 3:
        return torch.empty(0, 3, dtype=torch.long)
    if n_classes <= max_exhaustive:
        return torch.tensor(list(itertools.combinations(range(n_classes), 3)), dtype=torch.long)
    scores = torch.rand(n_samples, n_classes, generator=generator)
    return scores.argsort(dim=1)[:, :3]


def triangle_geometry(centroids: torch.Tensor, index: torch.Tensor, normalize: bool = True) -> float:
    """Mean triangle area over class-centroid triplets ``index`` (T, 3).

    Area of (a, b, c) is ``½·sqrt(‖ab‖²‖ac‖² − (ab·ac)²)``. With ``normalize``
    the mean area is divided by the centroids' mean squared norm around their
    mean, which makes the term scale-free. Returns 0 without triplets.
    """
    if index.numel() == 0:
        return 0.0
    c = centroids.to(torch.float64)
    c = c - c.mean(0, keepdim=True)
    a, b, d = c[index[:, 0]], c[index[:, 1]], c[index[:, 2]]
    ab, ac = a - b, a - d
    area = 0.5 * torch.sqrt(
        ((ab * ab).sum(1) * (ac * ac).sum(1) - (ab * ac).sum(1) ** 2).clamp(min=0.0)
    ).mean()
    if not normalize:
        return float(area)
    scale = (c * c).sum(1).mean()
    return float(area / scale) if float(scale) > 0 else 0.0
