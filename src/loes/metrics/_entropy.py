"""Matrix-based α-entropy (prompt and dataset entropy) and effective rank.

For a representation matrix Z (n × D) the Gram matrix ``K = Z Zᵀ`` divided by
its trace has non-negative eigenvalues that sum to 1; its Rényi α-entropy is
``S_α = log(Σ λᵢ^α) / (1 − α)`` (von Neumann entropy at α = 1). The non-zero
eigenvalues of ``Z Zᵀ`` and ``Zᵀ Z`` coincide, so the smaller one is used.
Entropies are divided by ``log r`` with ``r = min(n, D)`` the largest possible
rank, which puts them in [0, 1] for every α: 1 exactly when all r eigenvalues
are equal. Gram entries are used as they are (never clamped at 0).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from loes._exceptions import LOESError, LOESWarning
from loes._linalg import center as _center
from loes.metrics._common import as_matrix, as_tokens, entropy_of_spectrum, gram_spectrum

__all__ = [
    "dataset_entropy",
    "effective_rank",
    "matrix_entropy",
    "prompt_entropy",
    "rankme",
]


def _batched_entropy(
    z: torch.Tensor, counts: torch.Tensor, alpha: float, normalize: bool
) -> torch.Tensor:
    """α-entropy of each zero-padded (n_b, D) block of ``z`` (B, T, D).

    ``counts`` (B,) holds the number of real rows of each block. Returns (B,)
    with NaN where the entropy is undefined (zero trace, or r < 2 when
    normalising).
    """
    b, t, d = z.shape
    k = z @ z.transpose(1, 2) if t <= d else z.transpose(1, 2) @ z
    p, trace = gram_spectrum(k)
    ok = trace > 0
    h = entropy_of_spectrum(p, alpha)
    rank_bound = torch.clamp(counts.to(h.dtype), max=float(d))
    if normalize:
        ok = ok & (rank_bound >= 2)
        h = h / torch.log(rank_bound.clamp(min=2.0))
    return torch.where(ok, h, torch.full_like(h, float("nan")))


def matrix_entropy(z: Any, alpha: float = 1.0, *, normalize: bool = True) -> float:
    """Matrix-based α-entropy of the Gram matrix of the rows of ``z``.

    Parameters
    ----------
    z : array or tensor of shape (n, dim)
        Rows are the items (tokens of a prompt, or samples of a data set).
    alpha : float > 0
        Rényi order; 1 gives the von Neumann entropy.
    normalize : bool
        Divide by ``log(min(n, dim))`` so the value lies in [0, 1].

    Returns
    -------
    float
        NaN when undefined (all-zero rows, or fewer than 2 rows/columns when
        normalising).

    Examples
    --------
    >>> import torch
    >>> round(matrix_entropy(torch.eye(4)), 6)   # four equal eigenvalues
    1.0
    """
    t = as_matrix(z, "z", min_rows=1)
    counts = torch.tensor([t.shape[0]], dtype=t.dtype, device=t.device)
    return float(_batched_entropy(t[None], counts, alpha, normalize)[0])


def prompt_entropy(
    tokens: Any,
    mask: Any | None = None,
    alpha: float = 1.0,
    *,
    normalize: bool = True,
    reduction: str = "mean",
):
    """Prompt entropy: α-entropy of each prompt's token Gram matrix.

    Parameters
    ----------
    tokens : array or tensor of shape (batch, tokens, dim), or (tokens, dim)
        One layer's token states.
    mask : array of shape (batch, tokens), optional
        True (or 1) for real tokens; padding (left or right) is ignored.
    alpha : float > 0
    normalize : bool
        Divide each prompt's entropy by ``log(min(n_tokens, dim))``.
    reduction : {"mean", "none"}
        ``"mean"``: the mean over prompts where it is defined (a float);
        ``"none"``: a (batch,) tensor with NaN for undefined prompts (fewer than
        2 tokens, or all-zero states).

    Direction: lower means the layer compresses each prompt into fewer
    directions. Skean et al. find the lowest values in intermediate layers.

    Examples
    --------
    >>> import torch
    >>> x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    >>> 0 < prompt_entropy(x) <= 1
    True
    """
    z, m = as_tokens(tokens, mask)
    per_prompt = _batched_entropy(z, m.sum(1), alpha, normalize)
    return _reduce(per_prompt, reduction, "prompt_entropy")


def _reduce(values: torch.Tensor, reduction: str, name: str):
    if reduction == "none":
        return values
    if reduction != "mean":
        raise LOESError(f"reduction must be 'mean' or 'none'; got {reduction!r}")
    ok = ~torch.isnan(values)
    if not bool(ok.any()):
        warnings.warn(
            f"{name} is undefined for every prompt (too few tokens?)", LOESWarning, stacklevel=3
        )
        return float("nan")
    return float(values[ok].mean())


def dataset_entropy(
    x: Any, alpha: float = 1.0, *, normalize: bool = True, center: bool = False
) -> float:
    """Dataset entropy: α-entropy of the Gram matrix of pooled samples.

    Parameters
    ----------
    x : array or tensor of shape (n_samples, dim)
        One layer's pooled embeddings.
    alpha : float > 0
    normalize : bool
        Divide by ``log(min(n_samples, dim))``.
    center : bool
        Subtract the mean sample first (off by default, as in the study, so a
        large shared offset counts as low diversity).

    Direction: higher means the samples spread over more directions.

    Examples
    --------
    >>> import torch
    >>> x = torch.randn(2000, 8, generator=torch.Generator().manual_seed(0))
    >>> dataset_entropy(x) > 0.99          # an isotropic Gaussian is near the maximum 1
    True
    """
    t = as_matrix(x, "x")
    if center:
        t = _center(t)
    return matrix_entropy(t, alpha, normalize=normalize)


def effective_rank(x: Any, *, center: bool = False, eps: float = 0.0) -> float:
    """Effective rank (Roy & Vetterli): ``exp(H(p))`` with ``p = σ / Σσ``.

    Parameters
    ----------
    x : array or tensor of shape (n_samples, dim)
    center : bool
        Subtract the column means first.
    eps : float
        Added to every ``p`` before the entropy (RankMe uses 1e-7).

    Returns
    -------
    float in [1, min(n_samples, dim)]
        Equals r for a matrix with r equal non-zero singular values. 0 for an
        all-zero matrix. Higher means more directions are used.

    Examples
    --------
    >>> import torch
    >>> round(effective_rank(torch.eye(6)[:, :3] * 5.0), 6)
    3.0
    """
    t = as_matrix(x, "x", min_rows=1)
    if center:
        t = _center(t)
    s = torch.linalg.svdvals(t)
    total = s.sum()
    if float(total) <= 0:
        return 0.0
    p = s / total + eps
    return float(math.exp(float(entropy_of_spectrum(p, 1.0))))


def rankme(x: Any, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al.): the effective rank with ``eps`` added to ``p``.

    Parameters
    ----------
    x : array or tensor of shape (n_samples, dim)
        Embeddings, not centred (as in RankMe).

    Direction: higher is better (RankMe's claim for SSL encoders).
    """
    return effective_rank(x, center=False, eps=eps)
