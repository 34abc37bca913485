"""``preset="robust"`` (the default): LOES made scale-free, honest and fast.

Structure (spec section 3): greedy ridge-residual selection. At each step every
candidate layer ``l`` is scored by

    score_l = fit_l + alpha·(1 − iso_l) + gamma·red_l − eta·geo_l

- ``fit_l``: out-of-sample squared error of a ridge probe from the candidate
  — orthogonalised against the selected layers — to the current target,
  divided by the target's energy: the fraction of the current target left
  unexplained, in [0, ~1]. It cannot reach 0 by interpolation when N <= D.
  The estimate is generalised cross-validation (``cv="gcv"``, the default:
  in-sample residuals over ``1 − (1 + tr H)/N``) or exact leave-one-out
  (``cv="loo"``: each residual over its own ``1 − 1/N − H_ii``). The first
  target is the (standardised) labels; each later target is the previous
  winner's out-of-sample residual, so the selection stays honest from step
  to step.
- ``iso_l`` in [0, 1]: normalised participation ratio of the layer's
  covariance spectrum (:func:`loes.core.isotropy`).
- ``red_l``: the largest linear CKA between ``l`` and a selected layer.
- ``geo_l``: mean triangle area of class centroids of the orthogonalised
  candidate over all class triplets (seeded sample above 20 classes), divided
  by the centroids' mean squared norm.

Every ridge penalty is relative to the layer's spectrum (``reg`` × mean
non-zero eigenvalue), so scaling a layer or the targets changes nothing.

Speed: each layer is factorised once (Cholesky of the D × D primal or N × N
dual normal matrix, whichever is cheaper; the Gram matrix by a blocked
symmetric product), with ``tr H`` from a recursive triangular inverse (GCV)
or the hat diagonal from a triangular solve (LOO). Orthogonalisation uses a
ridge projection ``P = U W Uᵀ`` onto the dominant span of the selected layers
(top ``orth_rank`` directions of each, weights ``w = σ²/(σ² + μ)`` with
``μ = orth_reg`` × the mean eigenvalue), so it shrinks rather than
annihilates directions when Σ D_S >= N. The orthogonalised candidate's fit
then follows from the layer's own factorisation by the Woodbury identity:
per candidate and step the cost is one product and one solve with the new
directions (O(N·D·q)), not a new factorisation. With GCV the fit is computed
from rank × rank and D × m matrices and only the winner's residuals are
formed. Layer-pair CKAs come from Gram matrices computed once.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Any

import torch

from loes._exceptions import LOESError, LOESWarning
from loes._linalg import cka_matrix, sym_gram, triplets
from loes._progress import progress
from loes._rng import torch_generator
from loes._validation import Targets
from loes.core._engine import EngineOutput, RobustOptions, compute_dtype, score_total
from loes.result import StepTable

__all__ = ["DualFactor", "LayerFactor", "PrimalFactor", "run_robust"]

#: A feature is constant when its spread is at most this many machine epsilons
#: of its mean (the rounding level of its values, in the same units).
_CONSTANT_EPS = 10

#: Centred values beyond 2**±bound are rescaled by a power of two (exact), so
#: that Gram matrices and their squares neither overflow nor underflow.
_SAFE_EXPONENT = {torch.float32: 16, torch.float64: 64}


def constant_features(xc: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Which features are constant up to rounding: (1, D) bool.

    Parameters
    ----------
    xc : (N, D) the features minus ``mean`` (in the compute dtype).
    mean : (1, D) their column means.

    A feature is constant when its spread (standard deviation around ``xc``'s
    own mean, so that the rounding error of ``mean``, shared by the whole
    column, is not spread) is at most 10 eps·|mean|, the rounding level of its
    values in the same units: a column of 0.1s counts as constant, a column at
    offset 1e5 with unit spread does not. Scaling or shifting a feature leaves
    the verdict unchanged. One pass decides most columns (the spread is at most
    ``max |xc|``); only columns within 100× of the level get the exact test.
    """
    tol = _CONSTANT_EPS * torch.finfo(xc.dtype).eps * mean.abs()
    reach = torch.maximum(
        -xc.amin(0, keepdim=True), xc.amax(0, keepdim=True)
    )  # (faster than aminmax)
    const = reach <= tol
    cols = ((reach <= 100 * tol) & ~const)[0].nonzero().flatten()
    if cols.numel():
        d = xc[:, cols]
        d = d - d.mean(0, keepdim=True)
        size = d.abs().amax(0, keepdim=True)  # squares of d / size neither overflow nor underflow
        spread = (
            size
            * d.div_(size.clamp(min=torch.finfo(d.dtype).tiny)).pow_(2).mean(0, keepdim=True).sqrt()
        )
        const[:, cols] = spread <= tol[:, cols]
    return const


def power_of_two_unit(xc: torch.Tensor) -> float:
    """1.0, or the power of two that brings ``max |xc|`` into [0.5, 1) when it lies
    outside ``2**±bound``. Multiplying by it is exact."""
    if xc.numel() == 0:
        return 1.0
    lo, hi = torch.aminmax(xc)
    amax = max(-float(lo), float(hi))
    bound = 2.0 ** _SAFE_EXPONENT[xc.dtype]
    if amax == 0 or not math.isfinite(amax) or 1.0 / bound <= amax <= bound:
        return 1.0
    return 2.0 ** -math.frexp(amax)[1]


def _feature_scale(var: torch.Tensor, const: torch.Tensor, standardize: bool) -> torch.Tensor:
    """(1, D) multipliers: 1/std (``standardize``) or 1, and 0 for constant features."""
    if not standardize:
        return (~const).to(var.dtype)
    std = var.clamp(min=0).sqrt()
    return torch.where(const | (std <= 0), torch.zeros_like(std), 1.0 / std.clamp(min=1e-30))


class LayerFactor:
    """One layer's centred statistics and ridge factorisation, computed once.

    ``LayerFactor(x, reg, cdt, dual, ...)`` builds a :class:`DualFactor`
    (N × N kernel form) or a :class:`PrimalFactor` (D × D form); the two
    differ only in how the normal matrix is formed (``_normal_matrix``,
    ``_hat_diagonal``) and applied (``apply``), and in the form-specific parts
    of the GCV fit (``gcv_unprojected``, ``gcv_extra``, ``gcv_grow``,
    ``gcv_small``, ``gcv_projected``; see :func:`_gcv_residual`).

    Parameters
    ----------
    x : (N, D) the caller's layer (a view; centred on the fly).
    reg : float, relative ridge strength.
    cdt : compute dtype.
    dual : bool, use the N × N form.
    standardize : bool, unit variance per feature.
    cv : "gcv" (keep ``trace_h``) or "loo" (keep the hat diagonal ``h``).
    extra : (N, e) columns whose ``Xcᵀ extra`` is kept (targets, class
        averaging vectors), or None.

    Attributes
    ----------
    mean : (1, D) column means.
    scale : (1, D) per-feature multipliers of the centred features (1/std with
        ``standardize``, 0 for constant features, times an exact power of two
        for layers of extreme magnitude); ``unit`` is that power of two.
    iso : float, bounded isotropy in [0, 1].
    tr : float, trace of the (scaled) Gram matrix.
    lam : float, the ridge penalty (reg × mean non-zero eigenvalue).
    h : (N,) diagonal of the ridge hat matrix ``Xc (XcᵀXc + lam·I)⁻¹ Xcᵀ``
        (``cv="loo"`` only).
    trace_h : float, its trace (``cv="gcv"`` only).
    xt_extra : ``Xcᵀ extra`` (D × e), or None.
    dead : bool, True when every feature is constant (never selected). A layer
        whose features all vary, but only at the rounding level of their
        means (a huge offset), raises :class:`LOESError` instead.
    """

    dual = False

    def __new__(cls, x: torch.Tensor, reg: float, cdt: torch.dtype, dual: bool, **kwargs: Any):
        form = (DualFactor if dual else PrimalFactor) if cls is LayerFactor else cls
        return super().__new__(form)

    def __init__(
        self,
        x: torch.Tensor,
        reg: float,
        cdt: torch.dtype,
        dual: bool,
        standardize: bool = False,
        cv: str = "loo",
        extra: torch.Tensor | None = None,
    ):
        self.x = x
        n, d = x.shape
        xf = x.to(cdt)
        self.mean = xf.mean(0, keepdim=True)
        xc = xf - self.mean
        xt_extra = None if extra is None else (extra.T @ xc).T
        self.unit = power_of_two_unit(xc)
        if self.unit != 1.0:
            xc = xc * self.unit
        const = constant_features(xc, self.mean * self.unit)
        self.dead = bool(const.all())
        if self.dead and not bool((xf.amax(0) == xf.amin(0)).all()):
            raise LOESError(
                f"its features vary only at the rounding level of their means (|mean| up to "
                f"{float(self.mean.abs().max()):.3g} in {cdt}): an offset has swallowed the signal; "
                "centre the layer before casting it, or pass float64"
            )
        g, xc, scale = self._normal_matrix(xc, const, standardize, cv)
        self.scale = scale * self.unit
        self.xt_extra = None if xt_extra is None else xt_extra * self.scale.T
        self.h, self.trace_h = None, None
        tr = float(torch.diagonal(g).sum())
        if self.dead:
            self.iso, self.lam, self.tr = 0.0, 0.0, 0.0
            return
        if not math.isfinite(tr):
            raise LOESError(
                f"its Gram matrix overflows {cdt} (trace {tr}): pass float64 or rescale the layer"
            )
        r = min(n - 1, d)
        self.tr = tr
        flat = g.reshape(-1)
        self.iso = tr * tr / (r * float(torch.dot(flat, flat)))
        self.lam = reg * tr / r
        # The relative ridge bounds the condition number by about r / reg: float32
        # is accurate enough from reg = 0.1 on, float64 below.
        fdt = torch.float64 if reg < 0.1 or cdt == torch.float64 else cdt
        a = g.to(fdt)
        a.diagonal().add_(self.lam)
        chol = torch.linalg.cholesky(a)
        if cv == "gcv":
            # tr H = tr((A − lam I) A⁻¹) = size − lam·tr(A⁻¹), and tr(A⁻¹) = ‖L⁻¹‖²_F.
            flat = tri_inverse(chol).reshape(-1)
            self.trace_h = float(a.shape[0] - self.lam * float(torch.dot(flat, flat)))
        else:
            self.h = self._hat_diagonal(chol, xc, cdt)
        self.chol = chol.to(cdt)

    def solve(self, m: torch.Tensor) -> torch.Tensor:
        """``A⁻¹ m`` for the factorised normal matrix ``A = L Lᵀ``.

        Two triangular solves: on CPU 1.3–3× faster than ``torch.cholesky_solve``,
        which copies the factor on every call.
        """
        return torch.linalg.solve_triangular(
            self.chol.T, torch.linalg.solve_triangular(self.chol, m, upper=False), upper=True
        )

    def centred(self, cdt: torch.dtype) -> torch.Tensor:
        """The centred (and scaled) features, materialised: (N, D)."""
        return (self.x.to(cdt) - self.mean) * self.scale

    def xt(self, m: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
        """``Xcᵀ m`` without forming Xc: ``(Xᵀm − x̄ᵀ·1ᵀm) ∘ scale``."""
        # (mᵀX)ᵀ rather than XᵀM: up to 10× faster for thin m on a strided layer view
        return ((m.T @ self.x.to(cdt)).T - self.mean.T @ m.sum(0, keepdim=True)) * self.scale.T

    def xv(self, v: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
        """``Xc v`` without forming Xc."""
        v = v * self.scale.T
        return (v.T @ self.x.to(cdt).T).T - self.mean @ v  # as in xt: fast for thin v


class DualFactor(LayerFactor):
    """The N × N form: ``A = K + lam·I`` with the kernel ``K = Xc Xcᵀ``."""

    dual = True

    def _normal_matrix(self, xc, const, standardize, cv):
        scale = _feature_scale(xc.pow(2).mean(0, keepdim=True), const, standardize)
        xc = xc * scale
        return sym_gram(xc, rows=True), xc, scale

    def _hat_diagonal(self, chol, xc, cdt):
        # H = K (K + lam I)⁻¹ = I − lam (K + lam I)⁻¹, so h_i = 1 − lam [(K + lam I)⁻¹]_ii.
        linv = tri_inverse(chol)
        return (1.0 - self.lam * (linv * linv).sum(0)).to(cdt)

    def apply(self, m: torch.Tensor, cdt: torch.dtype, want_xt: bool = False):
        """``H m`` and, if asked, ``Xcᵀ m`` (for centroid updates)."""
        hm = m - self.lam * self.solve(m)
        return hm, (self.xt(m, cdt) if want_xt else None)

    def gcv_unprojected(self, r, den, cdt, xt_r=None) -> _Fit:
        hr, _ = self.apply(r, cdt)
        res = (r - hr) / den
        return _Fit(float((res * res).sum()), None, residual=res)

    def gcv_extra(self, extra, cdt):
        return None

    def gcv_grow(self, cache: _GcvCache, proj: _Projection, b, extra, cdt, want_xt):
        """Append ``Y = A⁻¹ B`` (and ``Z = Xcᵀ B`` for centroids); ``M1 = BᵀY``."""
        y = self.solve(b)
        if want_xt:
            cache.z = _append(cache.z, self.xt(b, cdt))
        return proj.b, y, None

    def gcv_small(self, proj: _Projection, cache: _GcvCache):
        """``M_s``, ``M_q`` with ``H = I − lam (K + lam I)⁻¹``."""
        return proj.btb64 - self.lam * cache.m1, cache.m1 - self.lam * cache.m2

    def gcv_projected(self, r, tr, proj, cache, rmat, c_mat, den, cdt, a0z0, xt_u) -> _Fit:
        lam = self.lam
        y0 = self.solve(tr)
        c = (rmat @ (proj.b.T @ (tr - lam * y0)).to(torch.float64)).to(cdt)  # R Bᵀ H tr
        pre = tr + proj.b @ c - lam * (y0 + cache.y @ c)
        res = (r - proj.t(pre)) / den
        return _Fit(float((res * res).sum()), xt_u, residual=res)


class PrimalFactor(LayerFactor):
    """The D × D form: ``A = XcᵀXc + lam·I``."""

    def _normal_matrix(self, xc, const, standardize, cv):
        g = sym_gram(xc)
        # scale the Gram, not the features: D² work instead of N·D
        scale = _feature_scale(torch.diagonal(g)[None, :] / xc.shape[0], const, standardize)
        g.mul_(scale).mul_(scale.T)
        return g, (xc * scale if cv == "loo" else None), scale

    def _hat_diagonal(self, chol, xc, cdt):
        z = torch.linalg.solve_triangular(chol.to(cdt), xc.T, upper=False)  # L⁻¹ Xcᵀ, (D, N)
        return (z * z).sum(0)

    def apply(self, m: torch.Tensor, cdt: torch.dtype, want_xt: bool = False):
        """``H m`` and, if asked, ``Xcᵀ m`` (for centroid updates)."""
        xtm = self.xt(m, cdt)
        return self.xv(self.solve(xtm), cdt), (xtm if want_xt else None)

    def gcv_unprojected(self, r, den, cdt, xt_r=None) -> _Fit:
        a0 = self.xt(r, cdt) if xt_r is None else xt_r
        z0 = self.solve(a0)
        sse = max(_primal_sse(r, a0, z0, a0, self.lam), 0.0)  # A z0 = a0
        return _Fit(sse / (den * den), None, make=lambda: (r - self.xv(z0, cdt)) / den)

    def gcv_extra(self, extra, cdt):
        a = self.xt(extra, cdt)
        return a, self.solve(a)

    def gcv_grow(self, cache: _GcvCache, proj: _Projection, b, extra, cdt, want_xt):
        """Append ``Z = Xcᵀ B`` and ``Y = A⁻¹ Z``; ``M1 = ZᵀY``. ``(Xcᵀ extra,
        A⁻¹ Xcᵀ extra)`` come from the same pass over the layer and the same solve."""
        q = b.shape[1]
        both = self.xt(torch.cat([b, extra], dim=1), cdt)
        cache.z = _append(cache.z, both[:, :q])
        solved = self.solve(both)
        return cache.z, solved[:, :q], (both[:, q:], solved[:, q:])

    def gcv_small(self, proj: _Projection, cache: _GcvCache):
        """``M_s``, ``M_q`` with ``H = Xc A⁻¹ Xcᵀ``."""
        return cache.m1, cache.m2

    def gcv_projected(self, r, tr, proj, cache, rmat, c_mat, den, cdt, a0z0, xt_u) -> _Fit:
        a0, z0 = a0z0
        zz0 = (cache.z.T @ z0).to(torch.float64)  # Bᵀ H tr
        c64 = rmat @ zz0
        c = c64.to(cdt)
        z = z0 + cache.y @ c  # fitted values: T Xc z
        az = a0 + cache.z @ c  # A z = Xcᵀ (tr + V·)
        w = zz0 + cache.m1 @ c64  # Bᵀ Xc z (Zᵀ Y = M1); ‖VᵀXc z‖² = wᵀ C w
        sse = max(_primal_sse(r, a0, z, az, self.lam) - float((w * (c_mat @ w)).sum()), 0.0)
        return _Fit(sse / (den * den), xt_u, make=lambda: (r - proj.t(self.xv(z, cdt))) / den)


def tri_inverse(l: torch.Tensor, base: int = 128) -> torch.Tensor:
    """Inverse of a lower-triangular matrix by recursive 2 × 2 blocking.

    ``[[A, 0], [C, D]]⁻¹ = [[A⁻¹, 0], [−D⁻¹ C A⁻¹, D⁻¹]]``: most of the work
    becomes matrix products, about twice as fast as one triangular solve
    against the identity (which ignores the identity's zeros).
    """
    n = l.shape[0]
    if n <= base:
        return torch.linalg.solve_triangular(
            l, torch.eye(n, dtype=l.dtype, device=l.device), upper=False
        )
    h = n // 2
    a_inv = tri_inverse(l[:h, :h], base)
    d_inv = tri_inverse(l[h:, h:], base)
    out = torch.zeros_like(l)
    out[:h, :h] = a_inv
    out[h:, h:] = d_inv
    out[h:, :h] = -(d_inv @ (l[h:, :h] @ a_inv))
    return out


def _choose_dual(n: int, d: int, m: int, q: int, k: int, cv: str = "loo") -> bool:
    """Pick the cheaper of the dual (N × N) and primal (D × D) forms for one layer
    of width ``d`` from flop counts (k − 1 orthogonalised fits of q + m columns)."""
    fits = max(k - 1, 0)
    if cv == "gcv":  # a trace instead of the hat diagonal; fits stay in the small space
        dual = 2 * n * n * d + n**3 + fits * 2 * n * n * (q + m)
        primal = 2 * n * d * d + d**3 + fits * (2 * n * d + 2 * d * d) * (q + m)
        return dual < primal
    dual = 2 * n * n * d + 1.3 * n**3 + fits * 2 * n * n * (q + m)
    primal = 2 * n * d * d + d**3 / 3 + fits * 4 * n * d * (q + m)
    return dual < primal


def _top_directions(
    f: LayerFactor, q: int, cdt: torch.dtype, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-q left singular vectors and singular values of the unit-trace centred layer.

    Exact (eigh of the small Gram) when min(N, D) is small, else a randomised
    range finder with two power iterations, seeded by ``generator``.
    """
    xc = f.centred(cdt) / math.sqrt(f.tr)
    n, d = xc.shape
    if min(n, d) <= 2 * q + 10:
        if n <= d:
            evals, evecs = torch.linalg.eigh((xc @ xc.T).to(torch.float64))
            u = evecs.flip(1)[:, :q]
            s = evals.flip(0)[:q].clamp(min=0).sqrt()
        else:
            evals, v = torch.linalg.eigh((xc.T @ xc).to(torch.float64))
            v = v.flip(1)[:, :q]
            s = evals.flip(0)[:q].clamp(min=0).sqrt()
            u = (xc.to(torch.float64) @ v) / s.clamp(min=1e-300)
        keep = s > s[0] * 1e-7 if s.numel() else s > 0
        return u[:, keep].to(cdt), s[keep].to(cdt)
    p = q + 10
    omega = torch.randn(d, p, generator=generator, dtype=torch.float32).to(
        device=xc.device, dtype=cdt
    )
    y = xc @ omega
    for _ in range(2):
        y, _r = torch.linalg.qr(y)
        y = xc @ (xc.T @ y)
    qmat, _r = torch.linalg.qr(y)
    b = qmat.T @ xc  # (p, D)
    ub, s, _vh = torch.linalg.svd(b, full_matrices=False)
    return (qmat @ ub[:, :q]), s[:q]


class _Projection:
    """Ridge projection ``P = U diag(w) Uᵀ`` onto the selected layers' dominant span.

    ``U = B · coef`` where ``B`` holds the selected layers' blocks of top
    directions (columns u·σ of each unit-trace layer), so products with ``U``
    follow from products with ``B``, which are cached per candidate.
    """

    def __init__(
        self, blocks: list[torch.Tensor], n_dims: int, n: int, orth_reg: float, cdt: torch.dtype
    ):
        self.blocks = blocks
        self.b = torch.cat(blocks, dim=1)  # (N, Σq), in the compute dtype
        b = self.b.to(torch.float64)
        # B = U Σ Vᵀ from the small q × q eigenproblem of BᵀB; U = B V Σ⁻¹.
        self.btb64 = b.T @ b
        ev, v = torch.linalg.eigh(self.btb64)
        ev, v = ev.flip(0).clamp(min=0), v.flip(1)
        mu = (
            orth_reg * len(blocks) / min(n - 1, n_dims)
        )  # orth_reg × mean eigenvalue of Σ K_j / tr_j
        w = ev / (ev + mu)
        keep = w > 0.05  # directions the ridge would barely touch are left alone
        self.coef = (v[:, keep] / ev[keep].sqrt()).to(cdt)
        self.u = (b @ self.coef.to(torch.float64)).to(cdt)
        self.w = w[keep].to(cdt)
        self.omega = (2 * self.w - self.w * self.w).sqrt()
        # V = U Ω^½ = B vc, shared by every candidate's GCV fit
        self.vc64 = self.coef.to(torch.float64) * self.omega.to(torch.float64)
        self.cc64 = self.vc64 @ self.vc64.T  # C = vc vcᵀ, (Σq × Σq)

    @property
    def rank(self) -> int:
        return int(self.w.numel())

    def t(self, m: torch.Tensor) -> torch.Tensor:
        """``(I − P) m``."""
        return m - self.u @ (self.w[:, None] * (self.u.T @ m))


def _geometry(centroids: torch.Tensor, index: torch.Tensor) -> float:
    """Scale-free mean triangle area from the centroids' Gram matrix (see
    :func:`loes.core.triangle_geometry`, the plain twin)."""
    c = centroids.to(torch.float64)
    c = c - c.mean(0, keepdim=True)
    g = c @ c.T
    scale = float(torch.diagonal(g).mean())
    if scale <= 0 or index.numel() == 0:
        return 0.0
    a, b, d = index[:, 0], index[:, 1], index[:, 2]
    ab2 = g[a, a] + g[b, b] - 2 * g[a, b]
    ac2 = g[a, a] + g[d, d] - 2 * g[a, d]
    abac = g[a, a] - g[a, b] - g[a, d] + g[b, d]
    area = 0.5 * torch.sqrt((ab2 * ac2 - abac * abac).clamp(min=0)).mean()
    return float(area) / scale


def _prepare_targets(tgt: Targets, task: str, device, cdt) -> torch.Tensor:
    """The first target: centred one-hot/soft labels, or unit-variance regression targets."""
    y = tgt.y.to(torch.float64)
    y = y - y.mean(0, keepdim=True)
    if task == "regression":
        std = y.std(0)
        if bool((std == 0).any()):
            bad = torch.nonzero(std == 0).flatten().tolist()
            raise LOESError(f"regression target column(s) {bad} are constant: nothing to predict")
        y = y / std  # unit-free: each output counts equally whatever its units
    else:
        y = y[:, y.abs().sum(0) > 0]  # drop columns of classes absent here
    return y.to(device=device, dtype=cdt)


def _class_averages(tgt: Targets | None, task: str, eta: float, device, cdt, generator):
    """``(C, N)`` class-averaging matrix and the centroid triplets, for hard labels
    with >= 3 classes present (else None and no triplets)."""
    none = None, torch.empty(0, 3, dtype=torch.long)
    if task != "classification" or tgt is None or tgt.labels is None or eta <= 0:
        return none
    lab = tgt.labels.to(device)
    present = torch.unique(lab)
    if present.numel() < 3:
        return none
    onehot = (lab[None, :] == present[:, None]).to(cdt)
    return onehot / onehot.sum(1, keepdim=True), triplets(
        int(present.numel()), generator=generator
    ).to(device)


def _factorise(
    layers, opts: RobustOptions, cdt, m: int, k: int, extra, show_progress
) -> list[LayerFactor]:
    """One :class:`LayerFactor` per layer, each in its cheaper form."""
    n = layers[0].shape[0]
    factors = []
    for i, x in enumerate(
        progress(layers, show_progress, desc="LOES: factorise layers", unit="layer")
    ):
        dual = _choose_dual(n, x.shape[1], m, opts.orth_rank, k, opts.cv)
        try:
            factors.append(
                LayerFactor(
                    x,
                    opts.reg,
                    cdt,
                    dual=dual,
                    standardize=opts.standardize,
                    cv=opts.cv,
                    extra=extra,
                )
            )
        except (LOESError, torch.linalg.LinAlgError) as e:
            raise LOESError(f"layer {i} cannot be factorised: {e}") from e
    return factors


def run_robust(
    layers: list[torch.Tensor],
    tgt: Targets | None,
    k: int,
    *,
    task: str,
    opts: RobustOptions,
    seed: int,
    show_progress,
    log: logging.Logger,
) -> EngineOutput:
    """Greedy selection with the robust score (see the module docstring).

    Parameters
    ----------
    layers : list of n_layers tensors of shape (n_samples, dim_l)
    tgt : Targets or None (``task="label_free"``)
    k : int, layers to select
    task, opts, seed, show_progress, log
        As validated by :func:`loes.select_layers_from_custom_embeddings`.
    """
    t0 = time.perf_counter()
    run = _Selection(layers, tgt, k, task, opts, seed, show_progress)
    t1 = time.perf_counter()
    run.select(log)
    t2 = time.perf_counter()
    if 1 in run.uninformative:
        warnings.warn(
            "no layer explains the targets out of sample (every out-of-sample fit fraction of the first pick >= 1): "
            "the targets may be unrelated to these features, or the calibration sample is too small "
            "for them; the picks rest on the isotropy, redundancy and geometry terms alone.",
            LOESWarning,
            stacklevel=3,
        )
    elif run.uninformative:
        log.info(
            "step(s) %s: no remaining layer adds to the fit out of sample",
            run.uninformative,
        )
    config = {
        "form": sorted({"dual" if f.dual else "primal" for f in run.factors}),
        "projection_rank": run.proj.rank if run.proj is not None else 0,
        "cka": ("debiased" if opts.cka_debiased else "linear")
        + (
            f" on {opts.cka_samples} sampled rows"
            if opts.cka_samples is not None and run.n > opts.cka_samples
            else ""
        ),
        "n_triplets": int(run.tri_index.shape[0]),
        "uninformative_steps": run.uninformative,
    }
    return EngineOutput(
        run.selected,
        run.scores,
        run.steps,
        run.excluded,
        {"prepare": t1 - t0, "select": t2 - t1},
        config,
    )


class _Selection:
    """One robust selection: the per-layer work done once (``__init__``), then
    the greedy steps (:meth:`select`), each scoring every remaining candidate
    (:meth:`score`) against the current target and the selected span."""

    def __init__(self, layers, tgt, k, task, opts: RobustOptions, seed: int, show_progress):
        self.k, self.task, self.opts, self.show_progress = k, task, opts, show_progress
        self.cdt = cdt = compute_dtype(layers)
        self.n = layers[0].shape[0]
        with_cka = k > 1 and (opts.gamma > 0 or task == "label_free")
        if with_cka:  # before any work
            opts.check_cka_memory(self.n, len(layers), torch.finfo(cdt).bits // 8)
        self.dims = [layer.shape[1] for layer in layers]
        device = layers[0].device
        self.generator = torch_generator(seed)
        self.y = _prepare_targets(tgt, task, device, cdt) if tgt is not None else None
        self.m = 0 if self.y is None else self.y.shape[1]
        self.class_means, self.tri_index = _class_averages(
            tgt, task, opts.eta, device, cdt, self.generator
        )
        # Products every layer needs once (Xcᵀ y, class sums), taken while its centred
        # features are at hand rather than in extra passes over the strided input.
        pieces = [
            p
            for p in (self.y, None if self.class_means is None else self.class_means.T)
            if p is not None
        ]
        extra = torch.cat(pieces, dim=1) if pieces else None
        self.factors = _factorise(layers, opts, cdt, self.m, k, extra, show_progress)
        self.excluded = [i for i, f in enumerate(self.factors) if f.dead]
        if self.excluded:
            warnings.warn(
                f"layer(s) {self.excluded} are constant (every feature at the rounding level of its mean) "
                "and cannot be selected",
                LOESWarning,
                stacklevel=4,
            )
        self.alive = [i for i in range(len(layers)) if i not in self.excluded]
        if len(self.alive) < k:
            raise LOESError(
                f"only {len(self.alive)} layer(s) have non-zero variance; cannot select k={k} "
                f"(constant layers: {self.excluded})"
            )
        self.cka = None
        if with_cka:
            unit_layers = [x if f.unit == 1.0 else x * f.unit for x, f in zip(layers, self.factors)]
            self.cka = cka_matrix(
                unit_layers,
                cdt,
                debiased=opts.cka_debiased,
                max_samples=opts.cka_samples,
                generator=self.generator,
            )
        self.iso_pen = [1.0 - f.iso for f in self.factors]
        self.centroids: dict[int, torch.Tensor] = {}
        self.caches = {l: (_GcvCache() if opts.cv == "gcv" else _BlockCache()) for l in self.alive}
        self.steps: list[StepTable] = []
        self.selected: list[int] = []
        self.scores: list[float] = []
        self.uninformative: list[
            int
        ] = []  # steps at which no candidate explained the target out of sample
        self.blocks: list[torch.Tensor] = []
        self.proj: _Projection | None = None

    def redundancy(self, l: int) -> float:
        """Largest CKA between layer ``l`` and a selected layer."""
        if self.cka is None:
            return 0.0
        return max((float(self.cka[l, j]) for j in self.selected), default=0.0)

    def fit(self, l: int, target: torch.Tensor, t_target: torch.Tensor) -> _Fit:
        """Out-of-sample fit of ``target`` on layer ``l`` orthogonalised against the selection."""
        f, proj, want_xt = self.factors[l], self.proj, self.class_means is not None
        if self.opts.cv == "loo":
            return _loo_residual(f, target, t_target, proj, self.cdt, want_xt, cache=self.caches[l])
        xt_y = (
            f.xt_extra[:, : self.m] if proj is None else None
        )  # the first target's Xcᵀ y is known
        return _gcv_residual(
            f, target, t_target, proj, self.cdt, want_xt, cache=self.caches[l], xt_r=xt_y
        )

    def geometry(self, l: int, fit: _Fit, cm_u: torch.Tensor | None) -> float:
        """Triangle term of the class centroids of layer ``l`` orthogonalised against the selection."""
        if l not in self.centroids:
            self.centroids[l] = self.factors[l].xt_extra[:, self.m :].T  # (C, D) class means of Xc
        cent = self.centroids[l]
        if self.proj is not None:
            cent = cent - cm_u @ (self.proj.w[:, None] * fit.xt_u.T)
        return _geometry(cent, self.tri_index)

    def score(self, cands: list[int], target: torch.Tensor | None):
        """Every candidate's terms and total, and its fit (for the winner's residual)."""
        a, g, e = self.opts.alpha, self.opts.gamma, self.opts.eta
        rows: dict[str, list[float]] = {
            name: [] for name in ("fit", "isotropy", "redundancy", "geometry", "total")
        }
        fits: dict[int, _Fit] = {}
        if target is not None:
            energy = float((target * target).sum())
            t_target = self.proj.t(target) if self.proj is not None else target
        cm_u = None
        if self.class_means is not None and self.proj is not None:
            cm_u = self.class_means @ self.proj.u  # class means of U, shared by every candidate
        for l in cands:
            fit, geo = 0.0, 0.0
            if target is not None:
                fits[l] = self.fit(l, target, t_target)
                fit = fits[l].sq / energy if energy > 0 else 1.0
                if self.class_means is not None:
                    geo = self.geometry(l, fits[l], cm_u)
            red = self.redundancy(l)
            total = score_total(fit, self.iso_pen[l], red, geo, a, g, e)
            for name, v in (
                ("fit", fit),
                ("isotropy", self.iso_pen[l]),
                ("redundancy", red),
                ("geometry", geo),
                ("total", total),
            ):
                rows[name].append(float(v))
        return rows, fits

    def select(self, log: logging.Logger) -> None:
        """The greedy steps: pick the best total, then make the winner's out-of-sample
        residual the next target and add its top directions to the projection."""
        target = self.y
        k = self.k
        for t in progress(
            range(1, k + 1),
            self.show_progress,
            desc="LOES: greedy selection",
            total=k,
            unit="layer",
        ):
            cands = [l for l in self.alive if l not in self.selected]
            rows, fits = self.score(cands, target)
            i_best = min(range(len(cands)), key=rows["total"].__getitem__)
            best = cands[i_best]
            self.steps.append(StepTable(step=t, selected=best, candidates=cands, terms=rows))
            self.selected.append(best)
            self.scores.append(rows["total"][i_best])
            log.info(
                "step %d: layer %d (score %.4f: fit %.4f, 1-iso %.4f, redundancy %.4f, geometry %.4f)",
                t,
                best,
                rows["total"][i_best],
                rows["fit"][i_best],
                rows["isotropy"][i_best],
                rows["redundancy"][i_best],
                rows["geometry"][i_best],
            )
            if target is not None and min(rows["fit"]) >= 1.0:
                self.uninformative.append(t)
            if t == k:
                break
            if target is not None:
                target = fits[best].residual()
                target = target - target.mean(0, keepdim=True)
            u, s = _top_directions(
                self.factors[best], self.opts.orth_rank, self.cdt, self.generator
            )
            self.blocks.append(u * s)
            n_dims = sum(self.dims[j] for j in self.selected)
            self.proj = _Projection(self.blocks, n_dims, self.n, self.opts.orth_reg, self.cdt)


class _Fit:
    """A candidate's out-of-sample fit: ``sq`` (sum of squared out-of-sample
    residuals), ``xt_u`` (``Xcᵀ U`` for centroids, or None) and the residuals
    themselves, computed on demand (only the winner's are needed)."""

    __slots__ = ("sq", "xt_u", "_make", "_res")

    def __init__(self, sq: float, xt_u: torch.Tensor | None, residual=None, make=None):
        self.sq, self.xt_u, self._res, self._make = sq, xt_u, residual, make

    def residual(self) -> torch.Tensor:
        if self._res is None:
            self._res = self._make()
        return self._res


class _BlockCache:
    """A candidate's products ``H b`` and ``Xcᵀ b`` with each selected block ``b``.

    The blocks only grow from step to step, so each product is computed once.
    """

    def __init__(self):
        self.hb: list[torch.Tensor] = []
        self.xtb: list[torch.Tensor] = []

    def products(
        self,
        f: LayerFactor,
        blocks: list[torch.Tensor],
        cdt: torch.dtype,
        want_xt: bool,
        extra: torch.Tensor,
    ):
        """``(H B, Xcᵀ B, H extra)``: new blocks and ``extra`` go through one product."""
        new = blocks[len(self.hb) :]
        widths = [b.shape[1] for b in new]
        hm, xtm = f.apply(torch.cat([*new, extra], dim=1), cdt, want_xt=want_xt and bool(new))
        for i, part in enumerate(torch.split(hm[:, : sum(widths)], widths, dim=1)):
            self.hb.append(part)
            if xtm is not None:
                self.xtb.append(xtm[:, sum(widths[:i]) : sum(widths[: i + 1])])
        return (
            torch.cat(self.hb, dim=1),
            torch.cat(self.xtb, dim=1) if want_xt else None,
            hm[:, sum(widths) :],
        )


def _loo_residual(
    f: LayerFactor,
    r: torch.Tensor,
    tr: torch.Tensor,
    proj: _Projection | None,
    cdt: torch.dtype,
    want_xt: bool,
    cache: _BlockCache | None = None,
) -> _Fit:
    """LOO residuals of the ridge fit of ``r`` (centred, N × m) on the candidate
    orthogonalised by ``proj`` (with an intercept), and ``Xcᵀ U`` for centroids.

    ``tr`` is ``(I − P) r``. With ``T = I − P`` and ``V = U Ω^½``
    (``Ω = 2W − W²``), the hat matrix of ``T Xc`` is ``T [H + G Q Gᵀ] T`` with
    ``H`` the layer's own hat matrix, ``G = H V`` and ``Q = (I − Vᵀ G)⁻¹``
    (Woodbury), so only products of ``H`` with a few columns are needed.
    """
    n = r.shape[0]
    if proj is None:
        hr, _ = f.apply(r, cdt)
        res = (r - hr) / (1.0 - 1.0 / n - f.h)[:, None]
        return _Fit(float((res * res).sum()), None, residual=res)
    hb, xtb, htr = (cache or _BlockCache()).products(f, proj.blocks, cdt, want_xt, extra=tr)
    hu = hb @ proj.coef  # H U
    xt_u = xtb @ proj.coef if xtb is not None else None
    g = hu * proj.omega  # H V
    vtg = (proj.u * proj.omega).T @ g  # Vᵀ H V, (q, q)
    eye = torch.eye(proj.rank, dtype=torch.float64, device=r.device)
    qmat = torch.linalg.inv(eye - vtg.to(torch.float64)).to(cdt)
    qmat = 0.5 * (qmat + qmat.T)
    fitted = proj.t(htr + g @ (qmat @ (g.T @ tr)))
    # diag(T H T) = h − 2·diag(P H) + diag(P H P)
    uthu = proj.u.T @ hu  # Uᵀ H U
    wu = proj.u * proj.w
    diag_th = f.h - 2 * (wu * hu).sum(1) + ((wu @ uthu) * wu).sum(1)
    tg = proj.t(g)
    h_tilde = diag_th + ((tg @ qmat) * tg).sum(1)
    res = (r - fitted) / (1.0 - 1.0 / n - h_tilde)[:, None]
    return _Fit(float((res * res).sum()), xt_u, residual=res)


class _GcvCache:
    """A candidate's small matrices for GCV fits against the selected blocks ``B``.

    Primal form: ``Z = Xcᵀ B`` and ``Y = A⁻¹ Z`` (D × Σq); dual form:
    ``Y = (K + lam I)⁻¹ B`` (N × Σq) and, for centroids, ``Z = Xcᵀ B``. Plus
    the Gram-like ``M1 = ZᵀY`` (primal) or ``BᵀY`` (dual) and ``M2 = YᵀY``
    (Σq × Σq), grown by the new blocks only.
    """

    def __init__(self):
        self.n_blocks = 0
        self.z: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.m1: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(
        self,
        f: LayerFactor,
        proj: _Projection,
        cdt: torch.dtype,
        want_xt: bool,
        extra: torch.Tensor,
    ):
        """Take in the blocks added since the last call. The primal form also
        returns ``(Xcᵀ extra, A⁻¹ Xcᵀ extra)`` (the dual form None)."""
        new = proj.blocks[self.n_blocks :]
        if not new:
            return f.gcv_extra(extra, cdt)
        self.n_blocks = len(proj.blocks)
        left, y, out = f.gcv_grow(self, proj, torch.cat(new, dim=1), extra, cdt, want_xt)
        self.y = _append(self.y, y)
        self.m1 = _grow_symmetric(self.m1, (left.T @ y).to(torch.float64))
        self.m2 = _grow_symmetric(self.m2, (self.y.T @ y).to(torch.float64))
        return out


def _append(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if old is None else torch.cat([old, new], dim=1)


def _grow_symmetric(old: torch.Tensor | None, cols: torch.Tensor) -> torch.Tensor:
    """``[[old, c], [cᵀ, new]]`` from the new columns ``cols = [c; new]``."""
    if old is None:
        return 0.5 * (cols + cols.T)
    p = old.shape[0]
    top = torch.cat([old, cols[:p]], dim=1)
    corner = cols[p:]
    bottom = torch.cat([cols[:p].T, 0.5 * (corner + corner.T)], dim=1)
    return torch.cat([top, bottom], dim=0)


def _gcv_residual(
    f: LayerFactor,
    r: torch.Tensor,
    tr: torch.Tensor,
    proj: _Projection | None,
    cdt: torch.dtype,
    want_xt: bool,
    cache: _GcvCache | None = None,
    xt_r: torch.Tensor | None = None,
) -> _Fit:
    """GCV fit of ``r`` on the candidate orthogonalised by ``proj`` (with an
    intercept), and ``Xcᵀ U`` for centroids. ``xt_r``: ``Xcᵀ r`` when already
    known (the first step's targets, kept by the factor).

    The hat matrix of ``T Xc`` is ``H̃ = T [H + G Q Gᵀ] T`` (see
    :func:`_loo_residual`). GCV needs only its trace,

        tr H̃ = tr H − tr S + tr(Q (GᵀG − S²)),   S = VᵀHV = VᵀG,

    and since ``GᵀG = VᵀH²V = S − lam·VᵀXc A⁻² XcᵀV`` (``A = XcᵀXc + lam I``)
    and ``Q S (I − S) = S``, this is ``tr H − lam·tr(Q VᵀXc A⁻² XcᵀV)``: small
    (rank × rank) matrices built from the cached ``M1``, ``M2``. Each residual is ``(r − H̃ r) / (1 − (1 + tr H̃)/N)``.
    In the primal form the fitted values are ``T Xc z`` with ``z`` in feature
    space, and their squared error follows from D × m products
    (``‖T Xc z‖² = zᵀ(A − lam I)z − ‖VᵀXc z‖²``): per candidate nothing of
    size N × rank is formed, and the N × m residuals only for the winner.
    """
    n = r.shape[0]
    if proj is None:
        return f.gcv_unprojected(r, max(1.0 - (1.0 + f.trace_h) / n, 1e-12), cdt, xt_r)
    cache = cache or _GcvCache()
    a0z0 = cache.update(f, proj, cdt, want_xt, extra=tr)  # primal: Xcᵀ T r and A⁻¹ of it
    # In B coordinates (V = B vc): S = vcᵀ M_s vc and VᵀXc A⁻² XcᵀV = vcᵀ M_q vc.
    m_s, m_q = f.gcv_small(proj, cache)
    # R = vc Q vcᵀ = C (I − M_s C)⁻¹ with C = vc vcᵀ (push-through identity): one
    # Σq × Σq solve, no projection of M_s, M_q onto the rank × rank basis.
    c_mat = proj.cc64
    eye = torch.eye(c_mat.shape[0], dtype=torch.float64, device=c_mat.device)
    rmat = torch.linalg.solve((eye - m_s @ c_mat).T, c_mat).T
    rmat = 0.5 * (rmat + rmat.T)
    # GᵀG − S² = S(I − S) − lam·VᵀXc A⁻² XcᵀV and Q S (I − S) = S, so tr H̃ = tr H − lam·tr(R M_q).
    trace = f.trace_h - f.lam * float((rmat * m_q).sum())
    den = max(1.0 - (1.0 + trace) / n, 1e-12)
    xt_u = cache.z @ proj.coef if want_xt else None
    return f.gcv_projected(r, tr, proj, cache, rmat, c_mat, den, cdt, a0z0, xt_u)


def _primal_sse(
    r: torch.Tensor, a: torch.Tensor, z: torch.Tensor, az: torch.Tensor, lam: float
) -> float:
    """``‖r − Xc z‖²`` from feature-space products, in float64, without forming Xc z:
    ``‖r‖² − 2 aᵀz + zᵀ(A − lam I) z`` with ``a = Xcᵀ r`` (here ``Xcᵀ T r``) and
    ``az = A z``. Not clamped: callers clamp the final value at 0."""
    f64 = torch.float64
    z64 = z.to(f64)
    sse = (
        float((r.to(f64) ** 2).sum())
        - 2 * float((a.to(f64) * z64).sum())
        + float((az.to(f64) * z64).sum())
        - lam * float((z64 * z64).sum())
    )
    return sse
