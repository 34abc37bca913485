"""Geometry of representations: curvature, intrinsic dimension, layer × layer CKA."""

from __future__ import annotations

import math
from typing import Any

import torch

from loes._exceptions import LOESError
from loes._linalg import as_float
from loes._linalg import cka_matrix as _cka_matrix
from loes._validation import check_embeddings
from loes.metrics._common import as_matrix, as_tokens
from loes.metrics._entropy import _reduce

__all__ = ["cka_matrix", "curvature", "twonn_dimension"]


def curvature(
    tokens: Any, mask: Any | None = None, *, reduction: str = "mean", degrees: bool = False
):
    """Mean turning angle of each prompt's path through token space.

    With ``v_k = z_{k+1} − z_k`` the steps between consecutive (unmasked)
    tokens, the curvature of a prompt is the mean of
    ``arccos(v_k · v_{k+1} / (‖v_k‖ ‖v_{k+1}‖))`` over its consecutive step
    pairs: 0 for a straight path, π/2 for steps at right angles, π when the
    path reverses. The signed cosine is used (a reversal is a sharp turn, not a
    straight line). Step pairs with a zero-length step have no angle and are
    skipped.

    Parameters
    ----------
    tokens : array or tensor of shape (batch, tokens, dim), or (tokens, dim)
    mask : array of shape (batch, tokens), optional
        True for real tokens; padding must be contiguous (left or right).
    reduction : {"mean", "none"}
        Mean over prompts with at least one angle, or a (batch,) tensor (NaN
        for prompts with fewer than 3 tokens).
    degrees : bool
        Report degrees instead of radians.

    Direction: lower means smoother token trajectories.

    Examples
    --------
    >>> import torch
    >>> line = torch.linspace(0, 1, 6)[:, None] * torch.ones(1, 4)
    >>> curvature(line)
    0.0
    """
    z, m = as_tokens(tokens, mask)
    step = z[:, 1:] - z[:, :-1]
    step_ok = m[:, 1:] & m[:, :-1]
    norm = torch.linalg.norm(step, dim=-1)
    step_ok = step_ok & (norm > 0)
    a, b = step[:, :-1], step[:, 1:]
    pair_ok = step_ok[:, :-1] & step_ok[:, 1:]
    denom = torch.where(pair_ok, norm[:, :-1] * norm[:, 1:], torch.ones_like(norm[:, 1:]))
    cos = ((a * b).sum(-1) / denom).clamp(-1.0, 1.0)
    angle = torch.where(pair_ok, torch.arccos(cos), torch.zeros_like(cos))
    count = pair_ok.sum(1)
    per_prompt = angle.sum(1) / count.clamp(min=1)
    per_prompt = torch.where(count > 0, per_prompt, torch.full_like(per_prompt, float("nan")))
    if degrees:
        per_prompt = torch.rad2deg(per_prompt)
    return _reduce(per_prompt, reduction, "curvature")


def twonn_dimension(
    x: Any,
    *,
    method: str = "fit",
    discard_fraction: float = 0.1,
    chunk_size: int = 2048,
) -> float:
    """Intrinsic dimension by the TwoNN estimator (Facco et al., 2017).

    For every sample the ratio ``μ = r₂ / r₁`` of the distances to its second
    and first nearest neighbours follows a Pareto law with exponent d on a
    d-dimensional manifold of locally uniform density.

    Parameters
    ----------
    x : array or tensor of shape (n_samples, dim)
    method : {"fit", "mle"}
        ``"fit"`` (Facco et al.): least-squares line through the origin of
        ``−log(1 − F(μ))`` against ``log μ`` after dropping the largest
        ``discard_fraction`` of the ratios. ``"mle"``: the maximum-likelihood
        estimate ``(n − 1) / Σ log μ`` (unbiased form).
    discard_fraction : float in [0, 1)
    chunk_size : int
        Rows of the distance matrix computed at once (memory stays
        ``chunk_size × n_samples``).

    Samples with a duplicate (r₁ = 0) are skipped. Direction: not universal;
    see the docs.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> plane = torch.randn(2000, 2, generator=g) @ torch.randn(2, 10, generator=g)
    >>> round(twonn_dimension(plane))
    2
    """
    t = as_matrix(x, "x", min_rows=3)
    if method not in ("fit", "mle"):
        raise LOESError(f"method must be 'fit' or 'mle'; got {method!r}")
    if not 0 <= discard_fraction < 1:
        raise LOESError(f"discard_fraction must be in [0, 1); got {discard_fraction}")
    n = t.shape[0]
    r1 = torch.empty(n, dtype=t.dtype, device=t.device)
    r2 = torch.empty(n, dtype=t.dtype, device=t.device)
    sq = (t * t).sum(1)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        d2 = sq[start:stop, None] + sq[None, :] - 2.0 * t[start:stop] @ t.T
        d2 = d2.clamp(min=0.0)
        rows = torch.arange(stop - start, device=t.device)
        d2[rows, rows + start] = float("inf")
        two = torch.topk(d2, 2, dim=1, largest=False).values.sqrt()
        r1[start:stop], r2[start:stop] = two[:, 0], two[:, 1]
    scale = float(torch.median(r2)) if n else 1.0
    ok = r1 > 1e-12 * max(scale, 1e-300)
    mu = (r2[ok] / r1[ok]).sort().values
    mu = mu[mu > 1.0] if method == "fit" else mu
    m = mu.numel()
    if m < 3:
        raise LOESError(
            f"TwoNN needs at least 3 samples with distinct neighbours; got {m} (duplicated rows?)"
        )
    logmu = torch.log(mu)
    if method == "mle":
        total = float(logmu.sum())
        return float("inf") if total <= 0 else (m - 1) / total
    keep = max(2, int(math.floor(m * (1.0 - discard_fraction))))
    f = torch.arange(1, m + 1, dtype=t.dtype, device=t.device) / m
    xs, ys = logmu[:keep], -torch.log1p(-f[:keep].clamp(max=1 - 1e-12))
    return float((xs * ys).sum() / (xs * xs).sum())


def cka_matrix(
    layers: Any, *, method: str = "auto", memory_limit: float = 4e8, debiased: bool = False
) -> torch.Tensor:
    """Linear CKA between every pair of layers, as an (L, L) matrix.

    The one implementation, :func:`loes._linalg.cka_matrix`, on all samples:
    each entry equals :func:`loes.core.linear_cka` of the two layers (biased
    estimator), or with ``debiased=True`` the unbiased-HSIC CKA the selector
    uses for its redundancy term.

    Parameters
    ----------
    layers : array of shape (n_samples, n_layers, dim), or a list of
        (n_samples, dim_l) arrays
    method : {"auto", "gram", "feature"}
        ``"gram"``: stacked N × N Gram matrices (L·N² memory); ``"feature"``:
        ``‖XᵢᵀXⱼ‖²_F`` per pair; ``"auto"`` picks the cheaper one.
    memory_limit : float
        Bytes allowed for the stacked Gram matrices under ``"auto"``.
    debiased : bool

    Returns
    -------
    torch.Tensor of shape (n_layers, n_layers), float64
        Symmetric, ones on the diagonal (zero rows/columns for constant layers).
    """
    if method not in ("auto", "gram", "feature"):
        raise LOESError(f"method must be 'auto', 'gram' or 'feature'; got {method!r}")
    return _cka_matrix(
        [as_float(x) for x in check_embeddings(layers)],
        debiased=debiased,
        method=method,
        memory_limit=memory_limit,
    )
