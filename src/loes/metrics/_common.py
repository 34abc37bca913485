"""Input conversion shared by the metric functions (numpy or torch in, float64 out)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from loes._exceptions import LOESError
from loes._linalg import as_float

__all__ = ["as_matrix", "as_tokens", "entropy_of_spectrum", "gram_spectrum"]


def _float64(x: Any) -> torch.Tensor:
    """``as_float`` that also takes non-contiguous numpy views (negative strides)."""
    if not isinstance(x, torch.Tensor):
        x = np.array(x, order="C", copy=True)
    return as_float(x)


def as_matrix(x: Any, what: str = "x", min_rows: int = 2) -> torch.Tensor:
    """A float64 (N, D) tensor; LOESError for other shapes or non-finite values."""
    t = _float64(x)
    if t.ndim != 2:
        raise LOESError(
            f"{what} must have shape (n_samples, dim); got shape {tuple(t.shape)}"
            + (": index one layer first, e.g. X[:, layer, :]" if t.ndim == 3 else "")
        )
    if t.shape[0] < min_rows:
        raise LOESError(f"{what} needs at least {min_rows} samples; got {t.shape[0]}")
    if not bool(torch.isfinite(t).all()):
        raise LOESError(f"{what} contains NaN/Inf values: drop or fix those samples")
    return t


def as_tokens(tokens: Any, mask: Any | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token states as float64 (B, T, D) and a bool mask (B, T).

    A single prompt of shape (T, D) is accepted as a batch of one. Padded
    positions (mask False) are zeroed so they cannot leak into sums.
    """
    t = _float64(tokens)
    if mask is not None and not isinstance(mask, torch.Tensor):
        mask = torch.from_numpy(np.array(mask, order="C", copy=True))
    if t.ndim == 2:
        t = t[None]
        if mask is not None and mask.ndim == 1:
            mask = mask[None]
    if t.ndim != 3:
        raise LOESError(
            f"token states must have shape (batch, tokens, dim) or (tokens, dim); got {tuple(t.shape)}"
        )
    if mask is None:
        m = torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)
    else:
        m = mask.to(t.device).bool()
        if tuple(m.shape) != tuple(t.shape[:2]):
            raise LOESError(
                f"mask must have shape (batch, tokens) = {tuple(t.shape[:2])}; got {tuple(m.shape)}"
            )
    if not bool(torch.isfinite(t[m]).all()):
        raise LOESError("token states contain NaN/Inf values at unmasked positions")
    return t * m[..., None], m


def entropy_of_spectrum(p: torch.Tensor, alpha: float) -> torch.Tensor:
    """Rényi entropy of probability vectors along the last axis (rows sum to 1).

    ``log(Σ pᵢ^α) / (1 − α)``; Shannon (von Neumann) entropy ``−Σ pᵢ log pᵢ``
    at α = 1. Zero entries contribute nothing.
    """
    if not alpha > 0:
        raise LOESError(f"alpha must be positive; got {alpha!r}")
    p = p.clamp(min=0.0)
    if abs(alpha - 1.0) < 1e-12:
        logp = torch.where(
            p > 0, torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p)
        )
        return -(p * logp).sum(-1)
    powered = torch.where(p > 0, p.pow(alpha), torch.zeros_like(p))
    return torch.log(powered.sum(-1)) / (1.0 - alpha)


def gram_spectrum(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues of symmetric PSD matrices ``k`` (..., n, n) divided by their sum.

    Returns ``(p, total)``: ``p`` sums to 1 along the last axis (0 where the
    total is 0) and ``total`` is the eigenvalue sum. Eigenvalues below the usual
    rank tolerance ``max(λ)·n·eps`` are rounding noise of exact zeros and are
    set to 0 (for α < 1 their powers would otherwise add up).
    """
    lam = torch.linalg.eigvalsh(k)
    tol = lam.amax(-1, keepdim=True) * k.shape[-1] * torch.finfo(lam.dtype).eps
    lam = torch.where(lam > tol, lam, torch.zeros_like(lam))
    total = lam.sum(-1, keepdim=True)
    p = lam / torch.where(total > 0, total, torch.ones_like(total))
    return p, total.squeeze(-1)
