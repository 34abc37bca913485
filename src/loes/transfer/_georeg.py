"""GeoReg: a geometry regulariser for the fused features of a training batch.

The LOES paper adds two terms to the task loss (spec section 5):

* spectral spread — the variance of the eigenvalues of ``cov(F) + 1e-4·I``
  of the batch features F, which pushes towards an isotropic feature space;
* class separation — minus the log of the area of the triangle spanned by the
  centroids of three classes present in the batch, skipped when the batch
  holds fewer than three classes;

with a total weight of 0.1. The eigenvalue variance is computed without an
eigendecomposition: ``Var(λ) = tr(C²)/P − (tr(C)/P)²`` for a P × P covariance
C (the ``1e-4·I`` shift moves every eigenvalue equally and leaves the variance
unchanged), so its gradient is smooth even when eigenvalues repeat.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loes._exceptions import LOESError
from loes._linalg import triangle_areas
from loes._rng import RandomState, torch_generator

__all__ = ["GeoReg", "eigenvalue_variance", "triangle_log_area"]


def eigenvalue_variance(features: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Population variance of the eigenvalues of ``cov(features) + eps·I``.

    Parameters
    ----------
    features : tensor of shape (batch, dim)

    Returns
    -------
    0-d tensor (differentiable); 0 for a batch of fewer than 2 samples.
    """
    b, p = features.shape
    if b < 2:
        return features.sum() * 0.0
    fc = features - features.mean(0, keepdim=True)
    # the smaller Gram matrix has the covariance's non-zero eigenvalues
    g = (fc.T @ fc if p <= b else fc @ fc.T) / (b - 1)
    # eigenvalues of C + eps I: those of g plus eps, and eps for the (p - rank) missing ones
    tr = torch.diagonal(g).sum() + eps * p
    tr2 = (g * g).sum() + 2 * eps * torch.diagonal(g).sum() + eps**2 * p
    return tr2 / p - (tr / p) ** 2


def triangle_log_area(
    features: torch.Tensor, labels: torch.Tensor, triple: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """``log(area + eps)`` of the triangle of the centroids of the classes in ``triple``
    (:func:`loes._linalg.triangle_areas` with the same ``eps``: finite gradients).

    Parameters
    ----------
    features : tensor of shape (batch, dim)
    labels : tensor of shape (batch,), integer class ids
    triple : tensor of shape (3,), three distinct class ids present in ``labels``
    """
    cents = torch.stack([features[labels == c].mean(0) for c in triple.tolist()])
    return torch.log(triangle_areas(cents[0], cents[1], cents[2], eps=eps) + eps)


class GeoReg(nn.Module):
    """Geometry regulariser usable in any training loop.

    ``loss = weight · (spread_weight · Var(λ(cov(F) + eps·I)) − triangle_weight · log area)``

    Parameters
    ----------
    weight : float
        Total weight (the paper uses 0.1).
    spread_weight, triangle_weight : float
        Relative weights of the two terms (1 and 1 in the paper).
    eps : float
        Ridge added to the covariance (1e-4 in the paper).
    triplets : {"random", "all"}
        ``"random"``: one triple of present classes drawn per call with the
        module's seeded generator (the paper's choice); ``"all"``: the mean of
        ``log area`` over every triple of present classes (deterministic).
    random_state : None, int, numpy Generator/RandomState or torch.Generator
        The generator used for ``triplets="random"`` (:func:`loes._rng.torch_generator`;
        None is fresh randomness).

    Examples
    --------
    >>> import torch
    >>> reg = GeoReg(weight=0.1, triplets="all")
    >>> f = torch.randn(32, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    >>> y = torch.arange(32) % 4
    >>> loss = reg(f, y)
    >>> loss.backward(); bool(torch.isfinite(f.grad).all())
    True

    Notes
    -----
    The triangle term needs at least three classes with samples in the batch;
    with fewer (or for regression, ``labels=None``) only the spread term
    applies. :attr:`last_terms` holds the unweighted terms of the last call.
    """

    def __init__(
        self,
        weight: float = 0.1,
        *,
        spread_weight: float = 1.0,
        triangle_weight: float = 1.0,
        eps: float = 1e-4,
        triplets: str = "random",
        random_state: RandomState = 0,
    ):
        super().__init__()
        if triplets not in ("random", "all"):
            raise LOESError(f"triplets must be 'random' or 'all'; got {triplets!r}")
        for name, value in (
            ("weight", weight),
            ("spread_weight", spread_weight),
            ("triangle_weight", triangle_weight),
            ("eps", eps),
        ):
            if not float(value) >= 0:
                raise LOESError(f"{name} must be a non-negative number; got {value!r}")
        self.weight = float(weight)
        self.spread_weight = float(spread_weight)
        self.triangle_weight = float(triangle_weight)
        self.eps = float(eps)
        self.triplets = triplets
        self.generator = torch_generator(random_state)
        self.last_terms: dict = {}

    def forward(self, features: torch.Tensor, labels: Any = None) -> torch.Tensor:
        """The weighted regulariser for one batch.

        Parameters
        ----------
        features : tensor of shape (batch, dim)
            Fused features (before the classifier).
        labels : tensor of shape (batch,), optional
            Integer class ids; the triangle term is skipped without them or
            with fewer than three classes present.

        Returns
        -------
        0-d tensor
        """
        if features.ndim != 2:
            raise LOESError(f"features must have shape (batch, dim); got {tuple(features.shape)}")
        spread = eigenvalue_variance(features, self.eps)
        tri = features.sum() * 0.0
        n_triples = 0
        if labels is not None and self.triangle_weight > 0:
            labels = torch.as_tensor(labels, device=features.device)
            if labels.shape[0] != features.shape[0]:
                raise LOESError(
                    f"labels must have one entry per row of features ({features.shape[0]}); "
                    f"got {labels.shape[0]}"
                )
            present = torch.unique(labels[labels >= 0])
            if present.numel() >= 3:
                if self.triplets == "random":
                    pick = torch.randperm(present.numel(), generator=self.generator)[:3]
                    triples = [present.cpu()[pick]]
                else:
                    triples = list(torch.combinations(present.cpu(), 3))
                tri = torch.stack(
                    [triangle_log_area(features, labels, t.to(labels.device)) for t in triples]
                ).mean()
                n_triples = len(triples)
        self.last_terms = {
            "spread": float(spread.detach()),
            "log_area": float(tri.detach()),
            "triangles": n_triples,
        }
        return self.weight * (self.spread_weight * spread - self.triangle_weight * tri)
