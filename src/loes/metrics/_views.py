"""Augmentation-based metrics: InfoNCE, LiDAR and DiME.

Each takes two or more *views* of the same samples: the representations of
augmented copies of each input (see :mod:`loes.augment`), row i of every view
coming from input i.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from loes._exceptions import LOESError
from loes._rng import RandomState, torch_generator
from loes.metrics._common import as_matrix, entropy_of_spectrum, gram_spectrum

__all__ = ["as_views", "dime", "infonce", "lidar"]


def as_views(views: Any, min_views: int = 2) -> list[torch.Tensor]:
    """A list of float64 (N, D) views from a list of arrays or a (Q, N, D) array."""
    if isinstance(views, (list, tuple)):
        out = [as_matrix(v, f"views[{i}]") for i, v in enumerate(views)]
    else:
        t = views if isinstance(views, torch.Tensor) else torch.as_tensor(np.asarray(views))
        if t.ndim != 3:
            raise LOESError(
                "views must be a list of (n_samples, dim) arrays or an array of shape "
                f"(n_views, n_samples, dim); got shape {tuple(t.shape)}"
            )
        out = [as_matrix(v, f"views[{i}]") for i, v in enumerate(t)]
    if len(out) < min_views:
        raise LOESError(f"this metric needs at least {min_views} views; got {len(out)}")
    shape = out[0].shape
    for i, v in enumerate(out):
        if v.shape != shape:
            raise LOESError(
                f"all views must have the same shape {tuple(shape)}; view {i} has {tuple(v.shape)}"
            )
    return out


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.norm(x, dim=1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def infonce(view_a: Any, view_b: Any, temperature: float = 0.1, *, symmetric: bool = True) -> float:
    """InfoNCE loss between two views, with cosine similarity.

    ``−(1/N) Σᵢ log( exp(sᵢᵢ/τ) / Σⱼ exp(sᵢⱼ/τ) )`` with ``sᵢⱼ`` the cosine
    similarity of row i of ``view_a`` and row j of ``view_b``; with
    ``symmetric=True`` the mean of the a→b and b→a losses. ``log N`` minus the
    loss is a lower bound on the mutual information between the views.

    Parameters
    ----------
    view_a, view_b : arrays of shape (n_samples, dim)
    temperature : float > 0

    Returns
    -------
    float in [0, ~log N + 2/τ]
        About ``log N`` when the views are unrelated. Direction: lower means
        each sample is recognised from its augmented copy (more invariance).

    Examples
    --------
    >>> import torch
    >>> x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    >>> infonce(x, x) < infonce(x, x.roll(1, 0))
    True
    """
    if not temperature > 0:
        raise LOESError(f"temperature must be positive; got {temperature!r}")
    a, b = as_views([view_a, view_b])
    s = _unit_rows(a) @ _unit_rows(b).T / temperature
    idx = torch.arange(s.shape[0], device=s.device)
    loss_ab = (torch.logsumexp(s, dim=1) - s[idx, idx]).mean()
    if not symmetric:
        return float(loss_ab)
    loss_ba = (torch.logsumexp(s, dim=0) - s[idx, idx]).mean()
    return float(0.5 * (loss_ab + loss_ba))


def lidar(views: Any, *, delta: float = 1e-4, eps: float = 1e-8) -> float:
    """LiDAR (Thilak et al., 2023): effective rank of the LDA matrix whose
    classes are the inputs and whose members are their augmented views.

    With ``μᵢ`` the mean of the q views of input i and ``μ`` the mean of all
    ``μᵢ``: ``Σ_b = Σᵢ (μᵢ − μ)(μᵢ − μ)ᵀ / (n − 1)``,
    ``Σ_w = Σᵢⱼ (eᵢⱼ − μᵢ)(eᵢⱼ − μᵢ)ᵀ / (n (q − 1)) + δ' I``,
    ``Σ_lda = Σ_w^{-1/2} Σ_b Σ_w^{-1/2}``, and LiDAR = ``exp(−Σ pₖ log pₖ)``
    with ``pₖ = λₖ / Σλ + eps`` over the eigenvalues of ``Σ_lda``.

    Parameters
    ----------
    views : list of q >= 2 arrays of shape (n_samples, dim), or an array of
        shape (q, n_samples, dim)
    delta : float
        Within-class ridge, relative to the mean within-class variance
        (``δ' = delta · tr(Σ_w) / dim``), so LiDAR does not depend on the scale
        of the features.
    eps : float

    Returns
    -------
    float in [1, min(n_samples − 1, dim)]
        Direction: higher is better (more directions separate inputs beyond
        their augmentation noise).
    """
    vs = as_views(views)
    e = torch.stack(vs, dim=1)  # (n, q, d)
    n, q, d = e.shape
    mu_i = e.mean(1)
    mu = mu_i.mean(0, keepdim=True)
    between = (mu_i - mu).T @ (mu_i - mu) / max(n - 1, 1)
    within_dev = (e - mu_i[:, None, :]).reshape(n * q, d)
    within = within_dev.T @ within_dev / (n * (q - 1))
    ridge = delta * float(torch.diagonal(within).sum()) / d
    if ridge <= 0:
        ridge = delta * max(float(torch.diagonal(between).sum()) / d, 1e-300)
    within = within + ridge * torch.eye(d, dtype=within.dtype, device=within.device)
    w_val, w_vec = torch.linalg.eigh(within)
    inv_sqrt = w_vec @ torch.diag(w_val.clamp(min=1e-300).rsqrt()) @ w_vec.T
    lam = torch.linalg.eigvalsh(inv_sqrt @ between @ inv_sqrt).clamp(min=0.0)
    total = lam.sum()
    if float(total) <= 0:
        return 1.0
    p = lam / total + eps
    return float(math.exp(float(entropy_of_spectrum(p, 1.0))))


def _joint_entropy(ka: torch.Tensor, kb: torch.Tensor, alpha: float) -> torch.Tensor:
    p, _ = gram_spectrum(ka * kb)
    return entropy_of_spectrum(p, alpha)


def dime(
    view_a: Any,
    view_b: Any,
    *,
    alpha: float = 1.0,
    n_permutations: int = 5,
    random_state: RandomState = 0,
) -> float:
    """DiME (Skean et al., 2023): a difference of matrix-based entropies that
    estimates the mutual information between two views.

    With unit-diagonal cosine Gram matrices ``K_a``, ``K_b`` and the joint
    entropy ``H(K_a, K_b) = S_α(K_a ∘ K_b / tr(K_a ∘ K_b))``,
    ``DiME = mean_π H(K_a, P_π K_b P_πᵀ) − H(K_a, K_b)``: pairing each sample
    with a random other sample's view (permuting *samples*, never features)
    destroys the dependence and raises the joint entropy.

    Parameters
    ----------
    view_a, view_b : arrays of shape (n_samples, dim_a), (n_samples, dim_b)
    alpha : float > 0
    n_permutations : int
        Sample permutations averaged over.
    random_state : None, int, numpy Generator/RandomState or torch.Generator
        The permutations are ``torch.randperm(n, generator=g)`` drawn in turn
        from ``g = loes._rng.torch_generator(random_state)`` (an int seeds
        ``torch.Generator().manual_seed``; None is fresh randomness).

    Returns
    -------
    float (nats)
        About 0 for independent views, up to ``log N``. Direction: higher is
        better (the views share more information).
    """
    if n_permutations < 1:
        raise LOESError(f"n_permutations must be >= 1; got {n_permutations}")
    a = as_matrix(view_a, "view_a")
    b = as_matrix(view_b, "view_b")
    if a.shape[0] != b.shape[0]:
        raise LOESError(
            f"views must have the same number of samples; got {a.shape[0]} and {b.shape[0]}"
        )
    gen = torch_generator(random_state)
    ua, ub = _unit_rows(a), _unit_rows(b)
    ka, kb = ua @ ua.T, ub @ ub.T
    n = ka.shape[0]
    joint = _joint_entropy(ka, kb, alpha)
    shuffled = []
    for _ in range(n_permutations):
        perm = torch.randperm(n, generator=gen).to(kb.device)
        shuffled.append(_joint_entropy(ka, kb[perm][:, perm], alpha))
    return float(torch.stack(shuffled).mean() - joint)
