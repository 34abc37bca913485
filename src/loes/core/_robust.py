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
from typing import Dict, List, Optional, Tuple

import torch

from loes._exceptions import LOESError, LOESWarning
from loes._progress import progress
from loes._validation import Targets
from loes._linalg import cka_matrix, sym_gram, triplets
from loes.core.select import EngineOutput, compute_dtype
from loes.result import StepTable

__all__ = ["run_robust", "LayerFactor"]

#: Relative variance below which a layer counts as constant.
_DEAD_TOL = 1e-10


class LayerFactor:
    """One layer's centred statistics and ridge factorisation, computed once.

    Attributes
    ----------
    mean : (1, D) column means.
    iso : float, bounded isotropy in [0, 1].
    lam : float, the ridge penalty (reg × mean non-zero eigenvalue).
    h : (N,) diagonal of the ridge hat matrix ``Xc (XcᵀXc + lam·I)⁻¹ Xcᵀ``
        (``cv="loo"`` only).
    trace_h : float, its trace (``cv="gcv"`` only).
    xt_extra : ``Xcᵀ extra`` for the ``extra`` columns given (targets, class
        averaging vectors), or None.
    dual : bool, True when the N × N form is used.
    dead : bool, True for a constant layer (never selected).
    """

    def __init__(
        self,
        x: torch.Tensor,
        reg: float,
        cdt: torch.dtype,
        dual: bool,
        standardize: bool = False,
        cv: str = "loo",
        extra: Optional[torch.Tensor] = None,
    ):
        self.x = x  # the caller's (N, D) view; centred on the fly
        n, d = x.shape
        xf = x.to(cdt)
        self.mean = xf.mean(0, keepdim=True)
        xc = xf - self.mean
        self.scale = None
        self.dual = dual
        # Xcᵀ extra (D × e) of the standardised features, or None; scaled below
        self.xt_extra = None if extra is None else (extra.T @ xc).T
        if dual:
            if standardize:
                self.scale = _inverse_std(xc.pow(2).mean(0, keepdim=True), self.mean)
                xc = xc * self.scale
            g = sym_gram(xc, rows=True)
        else:
            g = sym_gram(xc)
            if standardize:  # scale the Gram, not the features: D² work instead of N·D
                self.scale = _inverse_std(torch.diagonal(g)[None, :] / n, self.mean)
                g.mul_(self.scale).mul_(self.scale.T)
                if cv == "loo":
                    xc = xc * self.scale
        if self.xt_extra is not None and self.scale is not None:
            self.xt_extra = self.xt_extra * self.scale.T
        tr = float(torch.diagonal(g).sum())
        raw = float((self.mean * self.mean).sum()) * n + tr  # Σ x² = N‖x̄‖² + tr
        self.dead = tr <= _DEAD_TOL * raw
        self.h, self.trace_h = None, None
        if self.dead:
            self.iso, self.lam, self.tr = 0.0, 0.0, 0.0
            return
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
            linv = tri_inverse(chol)
            flat = linv.reshape(-1)
            self.trace_h = float(a.shape[0] - self.lam * float(torch.dot(flat, flat)))
        elif dual:
            # H = K (K + lam I)^-1 = I - lam (K + lam I)^-1, so h_i = 1 - lam [(K + lam I)^-1]_ii.
            linv = tri_inverse(chol)
            self.h = (1.0 - self.lam * (linv * linv).sum(0)).to(cdt)
        else:
            z = torch.linalg.solve_triangular(chol.to(cdt), xc.T, upper=False)  # L^-1 Xcᵀ, (D, N)
            self.h = (z * z).sum(0)
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
        """The centred (and standardised) features, materialised."""
        xc = self.x.to(cdt) - self.mean
        return xc if self.scale is None else xc * self.scale

    def xt(self, m: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
        """``Xcᵀ m`` without forming Xc: ``(Xᵀm − x̄ᵀ·1ᵀm) ∘ scale``."""
        # (mᵀX)ᵀ rather than XᵀM: up to 10× faster for thin m on a strided layer view
        out = (m.T @ self.x.to(cdt)).T - self.mean.T @ m.sum(0, keepdim=True)
        return out if self.scale is None else out * self.scale.T

    def xv(self, v: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
        """``Xc v`` without forming Xc."""
        if self.scale is not None:
            v = v * self.scale.T
        return (v.T @ self.x.to(cdt).T).T - self.mean @ v  # as in xt: fast for thin v

    def apply(self, m: torch.Tensor, cdt: torch.dtype, want_xt: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Return ``H m`` and, if asked, ``Xcᵀ m`` (the latter for centroid updates)."""
        if self.dual:
            hm = m - self.lam * self.solve(m)
            return hm, (self.xt(m, cdt) if want_xt else None)
        xtm = self.xt(m, cdt)
        return self.xv(self.solve(xtm), cdt), (xtm if want_xt else None)


def _inverse_std(var: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """1/std per feature, 0 for constant features.

    A feature counts as constant when its spread is at the rounding level of
    its mean (a column of 0.1s centres to ±1 ulp, not to exact zeros), so that
    rounding noise is never blown up to unit variance.
    """
    std = var.clamp(min=0).sqrt()
    tol = 100 * torch.finfo(var.dtype).eps
    const = std <= tol * mean.abs()
    return torch.where(const | (std <= 0), torch.zeros_like(std), 1.0 / std.clamp(min=1e-30))


def tri_inverse(l: torch.Tensor, base: int = 128) -> torch.Tensor:
    """Inverse of a lower-triangular matrix by recursive 2 × 2 blocking.

    ``[[A, 0], [C, D]]⁻¹ = [[A⁻¹, 0], [−D⁻¹ C A⁻¹, D⁻¹]]``: most of the work
    becomes matrix products, about twice as fast as one triangular solve
    against the identity (which ignores the identity's zeros).
    """
    n = l.shape[0]
    if n <= base:
        return torch.linalg.solve_triangular(l, torch.eye(n, dtype=l.dtype, device=l.device), upper=False)
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
) -> Tuple[torch.Tensor, torch.Tensor]:
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
    omega = torch.randn(d, p, generator=generator, dtype=torch.float32).to(device=xc.device, dtype=cdt)
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

    def __init__(self, blocks: List[torch.Tensor], n_dims: int, n: int, orth_reg: float, cdt: torch.dtype):
        self.blocks = blocks
        self.b = torch.cat(blocks, dim=1)  # (N, Σq), in the compute dtype
        b = self.b.to(torch.float64)
        # B = U Σ Vᵀ from the small q × q eigenproblem of BᵀB; U = B V Σ⁻¹.
        self.btb64 = b.T @ b
        ev, v = torch.linalg.eigh(self.btb64)
        ev, v = ev.flip(0).clamp(min=0), v.flip(1)
        mu = orth_reg * len(blocks) / min(n - 1, n_dims)  # orth_reg × mean eigenvalue of Σ K_j / tr_j
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


def run_robust(
    layers: List[torch.Tensor],
    tgt: Optional[Targets],
    k: int,
    *,
    task: str,
    params: Dict[str, float],
    random_state: Optional[int],
    show_progress,
    log: logging.Logger,
    orth_rank: int = 64,
    cka_samples: Optional[int] = 512,
    cka_debiased: bool = True,
    standardize: bool = True,
    fallback: str = "none",
    cv: str = "gcv",
) -> EngineOutput:
    t0 = time.perf_counter()
    reg, alpha, gamma, eta = params["reg"], params["alpha"], params["gamma"], params["eta"]
    orth_reg = params.get("orth_reg", 1.0)
    if int(orth_rank) < 1:
        raise LOESError(f"orth_rank must be a positive integer; got {orth_rank}")
    orth_rank = int(orth_rank)
    if cv not in ("loo", "gcv"):
        raise LOESError(f"cv must be 'loo' (exact leave-one-out) or 'gcv'; got {cv!r}")
    device = layers[0].device
    cdt = compute_dtype(layers)
    n = layers[0].shape[0]
    n_layers = len(layers)
    dims = [layer.shape[1] for layer in layers]
    seed = 0 if random_state is None else int(random_state)
    generator = torch.Generator().manual_seed(seed)

    y = _prepare_targets(tgt, task, device, cdt) if tgt is not None else None
    m = 0 if y is None else y.shape[1]

    # Class geometry: hard labels with >= 3 classes present.
    tri_index = torch.empty(0, 3, dtype=torch.long)
    class_means = None  # (C, N) averaging matrix
    if task == "classification" and tgt is not None and tgt.labels is not None and eta > 0:
        lab = tgt.labels.to(device)
        present = torch.unique(lab)
        if present.numel() >= 3:
            onehot = (lab[None, :] == present[:, None]).to(cdt)
            class_means = onehot / onehot.sum(1, keepdim=True)
            tri_index = triplets(int(present.numel()), generator=generator).to(device)

    # Products every layer needs once (Xcᵀ y, class sums), taken while its centred
    # features are at hand rather than in extra passes over the strided input.
    pieces = ([y] if y is not None else []) + ([class_means.T] if class_means is not None else [])
    extra = torch.cat(pieces, dim=1) if pieces else None
    factors: List[LayerFactor] = []
    for x in progress(layers, show_progress, desc="LOES: factorise layers", unit="layer"):
        dual = _choose_dual(n, x.shape[1], m, orth_rank, k, cv)
        factors.append(LayerFactor(x, reg, cdt, dual=dual, standardize=standardize, cv=cv, extra=extra))
    excluded = [i for i, f in enumerate(factors) if f.dead]
    if excluded:
        warnings.warn(
            f"layer(s) {excluded} are constant (zero variance) and cannot be selected",
            LOESWarning,
            stacklevel=4,
        )
    alive = [i for i in range(n_layers) if i not in excluded]
    if len(alive) < k:
        raise LOESError(
            f"only {len(alive)} layer(s) have non-zero variance; cannot select k={k} "
            f"(constant layers: {excluded})"
        )
    cka = None
    if k > 1 and (gamma > 0 or task == "label_free"):
        cka = cka_matrix(layers, cdt, debiased=cka_debiased, max_samples=cka_samples, generator=generator)
    t1 = time.perf_counter()

    def redundancy(l: int, selected: List[int]) -> float:
        return max((float(cka[l, j]) for j in selected), default=0.0) if cka is not None else 0.0

    iso_pen = [1.0 - f.iso for f in factors]

    centroids: Dict[int, torch.Tensor] = {}
    residual_fn = _gcv_residual if cv == "gcv" else _loo_residual
    caches = {l: (_GcvCache() if cv == "gcv" else _BlockCache()) for l in alive}
    uninformative: List[int] = []  # steps at which no candidate explained the target out of sample
    fell_back: List[int] = []
    if fallback not in ("none", "marginal"):
        raise LOESError(f"fallback must be 'none' or 'marginal'; got {fallback!r}")
    steps: List[StepTable] = []
    selected: List[int] = []
    scores: List[float] = []
    blocks: List[torch.Tensor] = []
    proj: Optional[_Projection] = None
    r_target = y
    n_dims_sel = 0

    for t in progress(range(1, k + 1), show_progress, desc="LOES: greedy selection", total=k, unit="layer"):
        cands = [l for l in alive if l not in selected]
        rows: Dict[str, List[float]] = {name: [] for name in ("fit", "isotropy", "redundancy", "geometry", "total")}
        loo_by_layer: Dict[int, _Fit] = {}
        if r_target is not None:
            energy = float((r_target * r_target).sum())
            tr_target = proj.t(r_target) if proj is not None else r_target
        if class_means is not None and proj is not None:
            cm_u = class_means @ proj.u  # class means of U, shared by every candidate
        for l in cands:
            f = factors[l]
            fit, geo = 0.0, 0.0
            if r_target is not None:
                res = residual_fn(
                    f, r_target, tr_target, proj, cdt, want_xt=class_means is not None, cache=caches[l],
                    xt_r=f.xt_extra[:, :m] if t == 1 else None,
                )
                fit = res.sq / energy if energy > 0 else 1.0
                xt_u = res.xt_u
                loo_by_layer[l] = res
                if class_means is not None:
                    if l not in centroids:
                        centroids[l] = f.xt_extra[:, m:].T  # (C, D) class means of Xc
                    cent = centroids[l]
                    if proj is not None:
                        cent = cent - cm_u @ (proj.w[:, None] * xt_u.T)
                    geo = _geometry(cent, tri_index)
            red = redundancy(l, selected)
            total = fit + alpha * iso_pen[l] + gamma * red - eta * geo
            for name, v in (("fit", fit), ("isotropy", iso_pen[l]), ("redundancy", red), ("geometry", geo), ("total", total)):
                rows[name].append(float(v))
        if t == 1 and r_target is not None:
            marginal = dict(zip(cands, rows["fit"]))  # each layer's own fit to the labels
        if fallback == "marginal" and t > 1 and r_target is not None and min(rows["fit"]) >= 1.0:
            # Nothing explains the residual: rank by each layer's own fit to the labels instead.
            rows["fit"] = [marginal[l] for l in cands]
            rows["total"] = [
                f_ + alpha * i_ + gamma * r_ - eta * g_
                for f_, i_, r_, g_ in zip(rows["fit"], rows["isotropy"], rows["redundancy"], rows["geometry"])
            ]
            fell_back.append(t)
        i_best = min(range(len(cands)), key=rows["total"].__getitem__)
        best = cands[i_best]
        steps.append(StepTable(step=t, selected=best, candidates=cands, terms=rows))
        selected.append(best)
        scores.append(rows["total"][i_best])
        log.info(
            "step %d: layer %d (score %.4f: fit %.4f, 1-iso %.4f, redundancy %.4f, geometry %.4f)",
            t, best, rows["total"][i_best], rows["fit"][i_best], rows["isotropy"][i_best],
            rows["redundancy"][i_best], rows["geometry"][i_best],
        )
        if r_target is not None and (t in fell_back or min(rows["fit"]) >= 1.0):
            uninformative.append(t)
        if t == k:
            break
        if r_target is not None:
            r_target = loo_by_layer[best].residual()
            r_target = r_target - r_target.mean(0, keepdim=True)
        # Update the projection onto the selected span (once per step, not per candidate).
        u, s = _top_directions(factors[best], orth_rank, cdt, generator)
        blocks.append(u * s)
        n_dims_sel += dims[best]
        proj = _Projection(blocks, n_dims_sel, n, orth_reg, cdt)
    t2 = time.perf_counter()
    if uninformative:
        warnings.warn(
            f"at step(s) {uninformative} no remaining layer explained the current target out of sample "
            "(every out-of-sample fit fraction >= 1): those picks rest on the isotropy, redundancy and "
            "geometry terms alone; more calibration samples would let the data decide them.",
            LOESWarning,
            stacklevel=4,
        )
    config = {
        "form": sorted({"dual" if f.dual else "primal" for f in factors}),
        "orth_rank": orth_rank,
        "standardize": standardize,
        "projection_rank": proj.rank if proj is not None else 0,
        "cka": ("debiased" if cka_debiased else "linear") + (
            f" on {cka_samples} sampled rows" if cka_samples is not None and n > cka_samples else ""
        ),
        "n_triplets": int(tri_index.shape[0]),
        "uninformative_steps": uninformative,
        "fallback": fallback,
        "cv": cv,
    }
    return EngineOutput(selected, scores, steps, excluded, {"prepare": t1 - t0, "select": t2 - t1}, config)


class _Fit:
    """A candidate's out-of-sample fit: ``sq`` (sum of squared out-of-sample
    residuals), ``xt_u`` (``Xcᵀ U`` for centroids, or None) and the residuals
    themselves, computed on demand (only the winner's are needed)."""

    __slots__ = ("sq", "xt_u", "_make", "_res")

    def __init__(self, sq: float, xt_u: Optional[torch.Tensor], residual=None, make=None):
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
        self.hb: List[torch.Tensor] = []
        self.xtb: List[torch.Tensor] = []

    def products(self, f: LayerFactor, blocks: List[torch.Tensor], cdt: torch.dtype, want_xt: bool,
                 extra: torch.Tensor):
        """``(H B, Xcᵀ B, H extra)``: new blocks and ``extra`` go through one product."""
        new = blocks[len(self.hb):]
        widths = [b.shape[1] for b in new]
        hm, xtm = f.apply(torch.cat([*new, extra], dim=1), cdt, want_xt=want_xt and bool(new))
        for i, part in enumerate(torch.split(hm[:, : sum(widths)], widths, dim=1)):
            self.hb.append(part)
            if xtm is not None:
                self.xtb.append(xtm[:, sum(widths[:i]) : sum(widths[: i + 1])])
        return (
            torch.cat(self.hb, dim=1),
            torch.cat(self.xtb, dim=1) if want_xt else None,
            hm[:, sum(widths):],
        )


def _loo_residual(
    f: LayerFactor,
    r: torch.Tensor,
    tr: torch.Tensor,
    proj: Optional[_Projection],
    cdt: torch.dtype,
    want_xt: bool,
    cache: Optional[_BlockCache] = None,
    xt_r: Optional[torch.Tensor] = None,
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
        self.z: Optional[torch.Tensor] = None
        self.y: Optional[torch.Tensor] = None
        self.m1: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None

    def update(
        self, f: LayerFactor, proj: "_Projection", cdt: torch.dtype, want_xt: bool, extra: Optional[torch.Tensor] = None
    ) -> Optional[torch.Tensor]:
        """Take in the blocks added since the last call. With ``extra`` (primal
        form only): return ``(Xcᵀ extra, A⁻¹ Xcᵀ extra)``, computed in the same
        pass over the layer and the same solve as the new blocks."""
        new = proj.blocks[self.n_blocks:]
        if not new:
            if extra is None:
                return None
            a = f.xt(extra, cdt)
            return a, f.solve(a)
        self.n_blocks = len(proj.blocks)
        b = torch.cat(new, dim=1)
        q = b.shape[1]
        out = None
        if f.dual:
            y = f.solve(b)
            if want_xt:
                self.z = _append(self.z, f.xt(b, cdt))
            left = proj.b
        else:
            both = f.xt(b if extra is None else torch.cat([b, extra], dim=1), cdt)
            self.z = _append(self.z, both[:, :q])
            solved = f.solve(both)  # one solve for the blocks and extra
            y = solved[:, :q]
            if extra is not None:
                out = (both[:, q:], solved[:, q:])
            left = self.z
        self.y = _append(self.y, y)
        self.m1 = _grow_symmetric(self.m1, (left.T @ y).to(torch.float64))
        self.m2 = _grow_symmetric(self.m2, (self.y.T @ y).to(torch.float64))
        return out


def _append(old: Optional[torch.Tensor], new: torch.Tensor) -> torch.Tensor:
    return new if old is None else torch.cat([old, new], dim=1)


def _grow_symmetric(old: Optional[torch.Tensor], cols: torch.Tensor) -> torch.Tensor:
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
    proj: Optional[_Projection],
    cdt: torch.dtype,
    want_xt: bool,
    cache: Optional[_GcvCache] = None,
    xt_r: Optional[torch.Tensor] = None,
) -> _Fit:
    """GCV fit of ``r`` on the candidate orthogonalised by ``proj`` (with an
    intercept), and ``Xcᵀ U`` for centroids.

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
        den = max(1.0 - (1.0 + f.trace_h) / n, 1e-12)
        if f.dual:
            hr, _ = f.apply(r, cdt)
            res = (r - hr) / den
            return _Fit(float((res * res).sum()), None, residual=res)
        a0 = f.xt(r, cdt) if xt_r is None else xt_r
        z0 = f.solve(a0)
        sse = max(_primal_sse(r, a0, z0, a0, f.lam), 0.0)  # A z0 = a0
        return _Fit(sse / (den * den), None, make=lambda: (r - f.xv(z0, cdt)) / den)
    cache = cache or _GcvCache()
    a0z0 = cache.update(f, proj, cdt, want_xt, extra=None if f.dual else tr)  # primal: Xcᵀ T r, A⁻¹ of it
    f64 = torch.float64
    lam = f.lam
    # In B coordinates (V = B vc): S = vcᵀ M_s vc and VᵀXc A⁻² XcᵀV = vcᵀ M_q vc.
    if f.dual:  # H = I − lam (K + lam I)⁻¹
        m_s = proj.btb64 - lam * cache.m1
        m_q = cache.m1 - lam * cache.m2
    else:  # H = Xc A⁻¹ Xcᵀ
        m_s, m_q = cache.m1, cache.m2
    # R = vc Q vcᵀ = C (I − M_s C)⁻¹ with C = vc vcᵀ (push-through identity): one
    # Σq × Σq solve, no projection of M_s, M_q onto the rank × rank basis.
    c_mat = proj.cc64
    eye = torch.eye(c_mat.shape[0], dtype=f64, device=c_mat.device)
    rmat = torch.linalg.solve((eye - m_s @ c_mat).T, c_mat).T
    rmat = 0.5 * (rmat + rmat.T)
    # GᵀG − S² = S(I − S) − lam·VᵀXc A⁻² XcᵀV and Q S (I − S) = S, so tr H̃ = tr H − lam·tr(R M_q).
    trace = f.trace_h - lam * float((rmat * m_q).sum())
    den = max(1.0 - (1.0 + trace) / n, 1e-12)
    xt_u = cache.z @ proj.coef if want_xt else None
    if f.dual:
        y0 = f.solve(tr)
        c = (rmat @ (proj.b.T @ (tr - lam * y0)).to(f64)).to(cdt)  # R Bᵀ H tr
        pre = tr + proj.b @ c - lam * (y0 + cache.y @ c)
        res = (r - proj.t(pre)) / den
        return _Fit(float((res * res).sum()), xt_u, residual=res)
    a0, z0 = a0z0
    zz0 = (cache.z.T @ z0).to(f64)  # Bᵀ H tr
    c64 = rmat @ zz0
    c = c64.to(cdt)
    z = z0 + cache.y @ c  # fitted values: T Xc z
    az = a0 + cache.z @ c  # A z = Xcᵀ (tr + V·)
    w = zz0 + cache.m1 @ c64  # Bᵀ Xc z (Zᵀ Y = M1); ‖VᵀXc z‖² = wᵀ C w
    sse = max(_primal_sse(r, a0, z, az, lam) - float((w * (c_mat @ w)).sum()), 0.0)

    def residual() -> torch.Tensor:
        return (r - proj.t(f.xv(z, cdt))) / den

    return _Fit(sse / (den * den), xt_u, make=residual)


def _primal_sse(r: torch.Tensor, a: torch.Tensor, z: torch.Tensor, az: torch.Tensor, lam: float) -> float:
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
