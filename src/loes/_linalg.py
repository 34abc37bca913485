"""The numerical building blocks: one implementation of each quantity LOES uses.

Every other module imports these; each function's docstring holds the formula
it implements, and ``tests/test_linalg.py`` checks each against a slow,
obviously correct twin (explicit refits, textbook CKA, loops).

- :func:`relative_penalty` and :class:`RidgePath`: the relative ridge and the one
  solver path giving weights, validation predictions, GCV and leave-one-out
  residuals for any number of strengths from one decomposition.
- :func:`column_stats` and :class:`LayerStandardizer`: the standardiser.
- :func:`cka_matrix` / :func:`linear_cka`: linear CKA, biased or debiased.
- :func:`triangle_areas` / :func:`triangle_geometry`: class-centroid triangles.
- :func:`masked_mean`: mean over the real (unmasked) positions.
- :func:`isotropy`, :func:`reference_isotropy`: spectrum flatness.

The published reference preset keeps its own formulas (``loes.core._reference``):
they define the paper's numbers and are not duplicates of these.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from loes._exceptions import LOESError

__all__ = [
    "LayerStandardizer",
    "RidgePath",
    "as_float",
    "center",
    "cka_matrix",
    "column_stats",
    "gram",
    "inverse_std",
    "isotropy",
    "linear_cka",
    "masked_mean",
    "reference_isotropy",
    "relative_penalty",
    "ridge_gcv_residuals",
    "ridge_loo_residuals",
    "sym_gram",
    "triangle_areas",
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


def sym_gram(x: torch.Tensor, rows: bool = False, base: int = 256) -> torch.Tensor:
    """``XᵀX`` (or ``XXᵀ`` with ``rows``) by recursive 2 × 2 blocking.

    Only the diagonal blocks and one off-diagonal block are multiplied (the
    other is its transpose), so about half the flops of one general product:
    a symmetric rank-k update that torch does not expose directly.
    """
    if rows:
        x = x.T
    d = x.shape[1]
    if d <= base:
        return x.T @ x
    h = d // 2
    a, b = x[:, :h], x[:, h:]
    g = torch.empty(d, d, dtype=x.dtype, device=x.device)
    g[:h, :h] = sym_gram(a, base=base)
    g[h:, h:] = sym_gram(b, base=base)
    off = b.T @ a
    g[h:, :h] = off
    g[:h, h:] = off.T
    return g


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


# ------------------------------------------------------------ standardiser
def column_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and inverse standard deviation of ``x`` (N, D).

    ``μ_j = mean_i x_ij``, ``σ_j = sqrt(mean_i (x_ij − μ_j)²)`` (ddof 0) and
    ``1/σ_j``, or 0 for a constant feature: one whose spread is 0 or at the
    rounding level of its own mean, ``σ_j <= 100·eps·|μ_j|`` (a column of 0.1s
    centres to ±1 ulp, not to exact zeros). The floor is relative to the
    feature's own scale, so rounding noise is never blown up to unit variance
    and multiplying a feature by any factor changes nothing.

    Returns
    -------
    (mean, inv_std) : tensors of shape (1, D)
    """
    mean = x.mean(0, keepdim=True)
    std = (x - mean).pow(2).mean(0, keepdim=True).sqrt()
    return mean, inverse_std(mean, std)


def inverse_std(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``1/σ`` per feature, 0 for a constant one (:func:`column_stats`'s rule, in the
    precision of ``std``), from a mean and ddof-0 standard deviation however computed."""
    const = (std <= 0) | (std <= 100 * torch.finfo(std.dtype).eps * mean.abs())
    return torch.where(const, torch.zeros_like(std), 1.0 / std.clamp(min=1e-300))


class LayerStandardizer:
    """Per-layer standardisation fitted on training data.

    Each feature becomes ``(x − μ) / σ`` (:func:`column_stats`: ddof 0,
    constant features become exactly 0), then each layer block is divided by
    ``sqrt(dim_l)`` so that every layer carries the same total variance
    whatever its width or scale.

    Attributes
    ----------
    means_ : list of tensors of shape (1, dim_l)
    scales_ : list of tensors of shape (1, dim_l)
        ``1 / (σ · sqrt(dim_l))`` per feature (0 for constant features).
    """

    def fit(self, layers: Sequence[torch.Tensor]) -> LayerStandardizer:
        stats = [column_stats(x) for x in layers]
        return self.set_stats([m for m, _ in stats], [s for _, s in stats])

    def set_stats(
        self, means: Sequence[torch.Tensor], inv_stds: Sequence[torch.Tensor]
    ) -> LayerStandardizer:
        """Use per-layer column means and inverse standard deviations (each (1, dim_l))
        computed elsewhere, e.g. from streamed moments."""
        self.means_ = list(means)
        self.scales_ = [s / np.sqrt(s.shape[1]) for s in inv_stds]
        return self

    def transform(self, layers: Sequence[torch.Tensor]) -> torch.Tensor:
        """Standardise and concatenate: (n_samples, sum of dim_l)."""
        if len(layers) != len(self.means_):
            raise LOESError(f"expected {len(self.means_)} layers; got {len(layers)}")
        return torch.cat([(x - m) * s for x, m, s in zip(layers, self.means_, self.scales_)], dim=1)


# -------------------------------------------------------------------- ridge
def relative_penalty(reg: float, trace: float, n: int, d: int) -> float:
    """The relative ridge: ``λ = reg · tr(XcᵀXc) / min(N − 1, D)``.

    ``tr(XcᵀXc) / min(N − 1, D)`` is the mean non-zero eigenvalue of the centred
    Gram matrix of N samples in D dimensions (full rank), so ``reg`` is unit-free
    and scaling the features changes no fit.
    """
    return float(reg) * float(trace) / max(min(n - 1, d), 1)


class RidgePath:
    """Ridge regression with an unpenalised intercept for many strengths, from one decomposition.

    With ``Xc = U diag(s) Vᵀ`` (thin SVD of the centred features) and a strength
    λ (:func:`relative_penalty` of ``reg`` when ``relative``, else ``reg``):

    - shrinkage ``f_k = s_k² / (s_k² + λ)``;
    - weights ``W = V diag(s / (s² + λ)) UᵀYc``, intercept ``b = ȳ − x̄W``;
    - hat matrix ``H = 11ᵀ/N + H_c`` with ``H_c = U diag(f) Uᵀ`` (the intercept
      counted);
    - in-sample residuals ``e = Yc − H_c Yc``;
    - leave-one-out residuals ``e_i / (1 − H_ii)``, exact for ridge with an
      unpenalised intercept;
    - GCV residuals ``e / (1 − tr H / N)`` with ``tr H = 1 + Σ f_k`` (Golub, Heath
      and Wahba, 1979): every residual over the mean of ``1 − H_ii``.

    From the centred kernel ``K = XcXcᵀ`` alone (``kernel=``, residuals only)
    each strength costs one Cholesky factorisation of ``A = K + λI`` instead:
    ``H_c = I − λA⁻¹``, so ``e = λA⁻¹Yc``, ``H_ii = 1/N + 1 − λ(A⁻¹)_ii`` and
    ``tr H = 1 + N − λ tr(A⁻¹)`` (the same quantities; cheaper for one strength).

    Directions with ``s_k² <= max(s²)·max(N, D)·eps`` are rounding noise of exact
    zeros and are dropped. A constant layer has none: it predicts the mean.

    Parameters
    ----------
    x : tensor of shape (N, D), optional
        Features (any float dtype; computed in float64).
    y : tensor of shape (N,) or (N, m)
    kernel : tensor of shape (N, N), optional
        The centred kernel ``XcXcᵀ`` instead of ``x``.
    dim : int, optional
        D, with ``kernel``.
    relative : bool
        Whether the ``reg`` passed to the methods is relative.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(50, 4, generator=g, dtype=torch.float64)
    >>> y = x @ torch.tensor([1.0, -2.0, 0.0, 0.5], dtype=torch.float64) + 3.0
    >>> path = RidgePath(x, y)
    >>> w, b = path.coef(1e-8)
    >>> [round(v, 4) for v in w[:, 0].tolist()], round(float(b), 4)
    ([1.0, -2.0, 0.0, 0.5], 3.0)
    >>> bool(path.loo_residuals(1.0).abs().mean() > path.loo_residuals(1e-4).abs().mean())
    True
    """

    def __init__(
        self,
        x: Any = None,
        y: Any = None,
        *,
        kernel: torch.Tensor | None = None,
        dim: int | None = None,
        relative: bool = True,
    ):
        y = as_float(y)
        self.y_mean = y.reshape(y.shape[0], -1).mean(0, keepdim=True)
        self.yc = y.reshape(y.shape[0], -1) - self.y_mean
        self.relative = relative
        self.n = self.yc.shape[0]
        self.kernel = None if kernel is None else as_float(kernel)
        if kernel is None:
            x = as_float(x)
            self.x_mean = x.mean(0, keepdim=True)
            u, s, vt = torch.linalg.svd(x - self.x_mean, full_matrices=False)
            s2, self.d = s * s, x.shape[1]
            self.trace = float(s2.sum())
            keep = (
                s2 > float(s2.max()) * max(self.n, self.d) * torch.finfo(s2.dtype).eps
                if s2.numel()
                else s2 > 0
            )
            self.u, self.s2, self.vt = u[:, keep], s2[keep], vt[keep]
            self.uty = self.u.T @ self.yc
        else:
            self.d = int(dim)
            self.trace = float(torch.diagonal(self.kernel).sum())

    def penalty(self, reg: float) -> float:
        """The absolute λ for ``reg``."""
        return relative_penalty(reg, self.trace, self.n, self.d) if self.relative else float(reg)

    def _hat(self, reg: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        """In-sample residuals ``e`` (N, m), ``diag(H_c)`` (N,) and ``tr H_c``."""
        lam = self.penalty(reg)
        if self.kernel is not None:
            a = self.kernel + lam * torch.eye(
                self.n, dtype=self.kernel.dtype, device=self.kernel.device
            )
            a_inv = torch.cholesky_inverse(torch.linalg.cholesky(a))
            diag = torch.diagonal(a_inv)
            return lam * (a_inv @ self.yc), 1.0 - lam * diag, float(self.n - lam * diag.sum())
        f = self.s2 / (self.s2 + lam)
        return self.yc - self.u @ (f[:, None] * self.uty), (self.u * self.u) @ f, float(f.sum())

    def residuals(self, reg: float) -> torch.Tensor:
        """In-sample residuals ``e`` (N, m)."""
        return self._hat(reg)[0]

    def loo_residuals(self, reg: float) -> torch.Tensor:
        """Exact leave-one-out residuals ``e_i / (1 − H_ii)`` (N, m)."""
        e, h, _ = self._hat(reg)
        return e / (1.0 - 1.0 / self.n - h)[:, None]

    def gcv_residuals(self, reg: float) -> torch.Tensor:
        """GCV residuals ``e / (1 − (1 + tr H_c)/N)`` (N, m)."""
        e, _, tr = self._hat(reg)
        return e / (1.0 - (1.0 + tr) / self.n)

    def coef(self, reg: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights (D, m) and intercept (m,) (from features only)."""
        if self.kernel is not None:
            raise LOESError("a RidgePath built from a kernel has no weights: pass the features")
        s = self.s2.sqrt()
        w = self.vt.T @ ((s / (self.s2 + self.penalty(reg)))[:, None] * self.uty)
        return w, (self.y_mean - self.x_mean @ w).squeeze(0)

    def predict(self, reg: float, x: Any) -> torch.Tensor:
        """Predictions (n, m) for new features ``x`` (n, D)."""
        w, b = self.coef(reg)
        return as_float(x) @ w + b


def ridge_loo_residuals(x: Any, y: Any, reg: float = 1e-2, relative: bool = True) -> torch.Tensor:
    """Exact leave-one-out residuals of ridge regression with an intercept.

    ``y_i − ŷ_{−i}(x_i)`` (N, m) where ``ŷ_{−i}`` is refitted without sample i,
    with the penalty of :func:`relative_penalty` (``relative=True``) or ``reg``
    itself: :meth:`RidgePath.loo_residuals`.
    """
    return RidgePath(x, y, relative=relative).loo_residuals(reg)


def ridge_gcv_residuals(x: Any, y: Any, reg: float = 1e-2, relative: bool = True) -> torch.Tensor:
    """Generalised cross-validation residuals of ridge regression with an intercept.

    Every in-sample residual over ``1 − (1 + tr H)/N`` (the intercept counted):
    :meth:`RidgePath.gcv_residuals`. Their mean square is the GCV estimate of
    the out-of-sample error.
    """
    return RidgePath(x, y, relative=relative).gcv_residuals(reg)


# ---------------------------------------------------------------------- CKA
def cka_matrix(
    layers: Sequence[torch.Tensor],
    cdt: torch.dtype = torch.float64,
    debiased: bool = True,
    max_samples: int | None = None,
    generator: torch.Generator | None = None,
    *,
    method: str = "gram",
    memory_limit: float = 4e8,
) -> torch.Tensor:
    """Layer × layer linear CKA on centred features, clamped to [0, 1].

    ``CKA(X, Y) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with ``K = XcXcᵀ``.
    The biased estimator uses ``HSIC(K, L) = Σ K ⊙ L = ‖XcᵀYc‖²_F``. ``debiased``
    uses the unbiased HSIC estimator (Song et al., 2012): with ``K̃`` = K with a
    zero diagonal, ``tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1``,
    which removes linear CKA's upward bias when N is not much larger than D
    (two independent noise layers score near 0, not near 1); it needs n >= 4
    (the biased estimator is used below). A pair with a zero norm scores 0.

    With ``max_samples`` a seeded subsample (``torch.randperm`` from ``generator``)
    of that many rows is used when N is larger: the selector's sampling rule.

    Parameters
    ----------
    layers : sequence of tensors of shape (n_samples, dim_l)
    cdt : dtype of the products
    debiased : bool
    max_samples : int, optional
    generator : torch.Generator, optional
    method : {"gram", "feature", "auto"}
        ``"gram"``: one N × N Gram matrix per layer, every pair from one product
        of the flattened Grams (L·N² memory). ``"feature"``: ``‖XᵢᵀXⱼ‖²_F`` per
        pair, the diagonal terms from the rows' squared norms (no N × N
        matrices). ``"auto"``: ``"gram"`` when N <= 2 × the mean width and the
        Grams take at most ``memory_limit`` bytes.
    memory_limit : float

    Returns
    -------
    tensor of shape (n_layers, n_layers), float64, on the CPU

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> a = torch.randn(40, 100, generator=g, dtype=torch.float64)
    >>> b = torch.randn(40, 100, generator=g, dtype=torch.float64)
    >>> biased = cka_matrix([a, b], debiased=False)[0, 1]
    >>> debiased = cka_matrix([a, b])[0, 1]
    >>> bool(biased > 0.5), bool(debiased < 0.05)  # independent noise at N < D
    (True, True)
    """
    n = layers[0].shape[0]
    idx = None
    if max_samples is not None and n > max_samples:
        idx = torch.randperm(n, generator=generator)[:max_samples].to(layers[0].device)
        n = max_samples
    debiased = debiased and n >= 4
    n_layers = len(layers)
    if method == "auto":
        mean_dim = sum(x.shape[1] for x in layers) / n_layers
        method = (
            "gram" if 8.0 * n_layers * n * n <= memory_limit and n <= 2 * mean_dim else "feature"
        )
    xcs = []
    for x in layers:
        xs = (x if idx is None else x[idx]).to(cdt)
        xcs.append(xs - xs.mean(0, keepdim=True))
    rows = torch.empty(n_layers, n, dtype=torch.float64, device=layers[0].device)
    if method == "gram":
        flat = torch.empty(n_layers, n * n, dtype=cdt, device=layers[0].device)
        for i, xc in enumerate(xcs):
            kx = flat[i].view(n, n)
            kx.copy_(sym_gram(xc, rows=True))
            if debiased:
                kx.diagonal().zero_()
            rows[i] = kx.sum(1, dtype=torch.float64)
        inner = (flat @ flat.T).to(torch.float64)  # Σ K_i ⊙ K_j for every pair
    else:
        inner = torch.empty(n_layers, n_layers, dtype=torch.float64, device=layers[0].device)
        for i in range(n_layers):
            for j in range(i, n_layers):
                inner[i, j] = inner[j, i] = (
                    torch.linalg.norm(xcs[i].T @ xcs[j]).to(torch.float64) ** 2
                )
        if debiased:  # K̃ = K − diag(K): Σ K̃_i ⊙ K̃_j = Σ K_i ⊙ K_j − diag_i · diag_j; K̃1 = −diag
            diag = torch.stack([(xc * xc).sum(1, dtype=torch.float64) for xc in xcs])
            inner = inner - diag @ diag.T
            rows = -diag
    if debiased:  # tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n-1)(n-2)) - 2/(n-2)·1ᵀK̃L̃1, up to a common factor
        tot = rows.sum(1)
        inner = (
            inner + torch.outer(tot, tot) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (rows @ rows.T)
        )
    norms = torch.diagonal(inner).clamp(min=0).sqrt()
    den = torch.outer(norms, norms)
    cka = torch.where(den > 0, inner / den.clamp(min=1e-300), torch.zeros_like(inner)).clamp(
        0.0, 1.0
    )
    return cka.cpu()


def linear_cka(x: Any, y: Any, debiased: bool = False) -> float:
    """Linear CKA between two representations (N, D₁) and (N, D₂) of the same samples.

    Biased: ``‖YcᵀXc‖²_F / (‖XcᵀXc‖_F ‖YcᵀYc‖_F)`` in [0, 1]: 1 for
    representations equal up to rotation and isotropic scale, 0 for orthogonal
    ones; 0 when either is constant. ``debiased``: the unbiased HSIC estimator
    (see :func:`cka_matrix`, of which this is one entry).
    """
    return float(cka_matrix([as_float(x), as_float(y)], debiased=debiased)[0, 1])


# ------------------------------------------------------------ class geometry
def triplets(
    n_classes: int,
    max_exhaustive: int = 20,
    n_samples: int = 1140,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Index triplets of distinct classes: all of them when ``n_classes <=
    max_exhaustive``, else ``n_samples`` drawn with ``generator``."""
    if n_classes < 3:
        return torch.empty(0, 3, dtype=torch.long)
    if n_classes <= max_exhaustive:
        return torch.tensor(list(itertools.combinations(range(n_classes), 3)), dtype=torch.long)
    scores = torch.rand(n_samples, n_classes, generator=generator)
    return scores.argsort(dim=1)[:, :3]


def triangle_areas(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, eps: float = 0.0
) -> torch.Tensor:
    """Areas of the triangles with corners ``a``, ``b``, ``c`` (each (T, D) or (D,)).

    ``½·sqrt(max(‖ab‖²‖ac‖² − (ab·ac)², 0) + eps²)`` with ``ab = b − a``,
    ``ac = c − a`` (Lagrange's identity; any dimension). ``eps > 0`` keeps the
    gradient finite at a degenerate triangle.
    """
    ab, ac = b - a, c - a
    g = (ab * ab).sum(-1) * (ac * ac).sum(-1) - (ab * ac).sum(-1) ** 2
    return 0.5 * torch.sqrt(g.clamp(min=0.0) + eps**2)


def triangle_geometry(
    centroids: torch.Tensor, index: torch.Tensor, normalize: bool = True
) -> float:
    """Mean triangle area (:func:`triangle_areas`) over class-centroid triplets ``index`` (T, 3).

    With ``normalize`` the mean area is divided by the centroids' mean squared
    norm around their mean, which makes the term scale-free. Returns 0 without
    triplets.
    """
    if index.numel() == 0:
        return 0.0
    c = centroids.to(torch.float64)
    c = c - c.mean(0, keepdim=True)
    area = triangle_areas(c[index[:, 0]], c[index[:, 1]], c[index[:, 2]]).mean()
    if not normalize:
        return float(area)
    scale = (c * c).sum(1).mean()
    return float(area / scale) if float(scale) > 0 else 0.0


# --------------------------------------------------------------- masked mean
def masked_mean(
    x: torch.Tensor, mask: torch.Tensor | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Mean over the real positions: ``Σ_t m_t x_t / max(Σ_t m_t, 1)``.

    Parameters
    ----------
    x : tensor of shape (batch, tokens, dim)
    mask : tensor of shape (batch, tokens), optional
        True (or non-zero) at real positions; None means all are real.
    dtype : torch.dtype, optional
        Accumulation and output dtype (default ``x.dtype``).

    Returns
    -------
    tensor of shape (batch, dim)
        A row with no real position is 0. Padded positions are never read
        (``where`` rather than a product), so NaN padding cannot leak in.
    """
    dtype = x.dtype if dtype is None else dtype
    if mask is None:
        return x.mean(dim=1, dtype=dtype)
    m = mask.to(device=x.device, dtype=torch.bool)
    total = torch.where(m.unsqueeze(-1), x, x.new_zeros(())).sum(dim=1, dtype=dtype)
    return total / m.sum(dim=1, keepdim=True).clamp(min=1).to(dtype)
