"""Label-free metrics of streamed data: the ones that are functions of XᵀX alone.

Dataset entropy, effective rank, RankMe and isotropy depend on the data only
through the spectrum of the (centred or raw) Gram matrix, and ``XXᵀ`` has the
same non-zero eigenvalues as ``XᵀX``. ``XcᵀXc = M2`` and
``XᵀX = M2 + n x̄x̄ᵀ`` are additive over rows (:class:`loes.stats.Moments`),
so these metrics can be computed over a data set far larger than memory,
shard by shard, with the same conventions as :func:`loes.metrics.profile`:

- ``dataset_entropy``: raw Gram (not centred), Rényi α, divided by ``log min(n, D)``;
- ``effective_rank``: centred, ``exp H(σ/Σσ)``;
- ``rankme``: raw, ``p = σ/Σσ + 1e-7``;
- ``isotropy``: centred, ``(Σλ)² / (r Σλ²)`` with ``r = min(n − 1, D)``.

TwoNN (nearest neighbours) and the CKA matrix (cross-layer products) are not
functions of per-layer moments and are not computed here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from loes._exceptions import LOESError
from loes._progress import ProgressSetting, progress
from loes.metrics._common import entropy_of_spectrum, gram_spectrum
from loes.metrics._profile import METRICS, MetricProfile
from loes.stats import LayerMoments, Moments

__all__ = ["STREAMING_METRICS", "covariance_metrics", "streaming_profile"]

#: Metrics computable from streamed moments, in report order.
STREAMING_METRICS = ("dataset_entropy", "effective_rank", "rankme", "isotropy")


def _check_metrics(metrics: Sequence[str] | None) -> list[str]:
    wanted = list(metrics) if metrics is not None else list(STREAMING_METRICS)
    bad = [m for m in wanted if m not in STREAMING_METRICS]
    if bad:
        known = [m for m in bad if m in METRICS]
        why = (
            f": {known} need the samples themselves (TwoNN, token or view metrics), not "
            "moments; use loes.metrics.profile on an in-memory sample"
            if known
            else ""
        )
        raise LOESError(
            f"metric(s) {bad} cannot be computed from streamed moments{why}; "
            f"choose from {list(STREAMING_METRICS)}"
        )
    return wanted


def _eigenvalues(moments: Moments, centered: bool) -> torch.Tensor:
    """The min(n, D) largest eigenvalues of XcᵀXc or XᵀX, descending; rounding noise of exact
    zeros (below ``max λ · D · eps``) set to 0, as in :func:`loes.metrics._common.gram_spectrum`."""
    lam = torch.linalg.eigvalsh(torch.from_numpy(moments.xtx(centered))).flip(0)
    tol = lam[0].clamp(min=0) * lam.shape[0] * torch.finfo(lam.dtype).eps
    lam = torch.where(lam > tol, lam, torch.zeros_like(lam))
    return lam[: min(moments.n, moments.dim)]


def _effective_rank(lam: torch.Tensor, eps: float) -> float:
    s = lam.sqrt()
    total = s.sum()
    if float(total) <= 0:
        return 0.0
    return float(math.exp(float(entropy_of_spectrum(s / total + eps, 1.0))))


def covariance_metrics(
    moments: Moments, *, alpha: float = 1.0, metrics: Sequence[str] | None = None
) -> dict[str, float]:
    """The label-free metrics of one layer from its streamed moments.

    Parameters
    ----------
    moments : loes.stats.Moments
        At least one row; targets, if any, are ignored.
    alpha : float > 0
        Rényi order of the dataset entropy.
    metrics : list of str, optional
        A subset of :data:`STREAMING_METRICS` (default all).

    Returns
    -------
    dict of str to float
        Equal, up to rounding, to ``dataset_entropy(x, alpha)``,
        ``effective_rank(x, center=True)``, ``rankme(x)`` and ``isotropy(x)``
        on the rows behind the moments (NaN where those are undefined).

    Examples
    --------
    >>> import numpy as np
    >>> from loes.stats import Moments
    >>> from loes.metrics import effective_rank
    >>> x = np.random.default_rng(0).normal(size=(500, 8))
    >>> m = Moments().update(x[:200]).update(x[200:])
    >>> got = covariance_metrics(m)["effective_rank"]
    >>> bool(abs(got - effective_rank(x, center=True)) < 1e-10)
    True
    """
    wanted = _check_metrics(metrics)
    if not isinstance(moments, Moments):
        raise LOESError(f"moments must be a loes.stats.Moments; got {type(moments).__name__}")
    if moments.n < 1:
        raise LOESError("these moments hold no rows: update them with at least one batch")
    if not alpha > 0:
        raise LOESError(f"alpha must be positive; got {alpha!r}")
    out: dict[str, float] = {}
    n, d = moments.n, moments.dim
    if "dataset_entropy" in wanted:
        p, total = gram_spectrum(torch.from_numpy(moments.xtx(centered=False)))
        r = min(n, d)
        h = float(entropy_of_spectrum(p, alpha))
        out["dataset_entropy"] = h / math.log(r) if float(total) > 0 and r >= 2 else float("nan")
    if "effective_rank" in wanted:
        out["effective_rank"] = _effective_rank(_eigenvalues(moments, True), 0.0)
    if "rankme" in wanted:
        out["rankme"] = _effective_rank(_eigenvalues(moments, False), 1e-7)
    if "isotropy" in wanted:
        m2 = torch.from_numpy(moments.m2)
        tr = float(torch.diagonal(m2).sum())
        r = min(n - 1, d)
        out["isotropy"] = tr**2 / (r * float((m2 * m2).sum())) if tr > 0 and r > 0 else 0.0
    return {m: out[m] for m in wanted}


def streaming_profile(
    source: Any,
    *,
    metrics: Sequence[str] | None = None,
    alpha: float = 1.0,
    layer_names: Sequence[str] | None = None,
    show_progress: ProgressSetting = "auto",
) -> MetricProfile:
    """Every streamable label-free metric for every layer, from moments or a stream of batches.

    Parameters
    ----------
    source : LayerMoments, or an iterable of batches
        Filled :class:`loes.stats.LayerMoments` (e.g. merged across workers),
        or batches read once: arrays of shape (n, n_layers, dim), lists of
        n_layers (n, dim_l) arrays, or ``(x, y)`` pairs (``y`` ignored).
        Memory is ``Σ_l D_l²`` float64, whatever the number of rows.
    metrics : list of str, optional
        A subset of :data:`STREAMING_METRICS` (default all).
    alpha : float
        Rényi order of the dataset entropy.
    layer_names : sequence of str, optional

    Returns
    -------
    MetricProfile
        The same values as :func:`loes.metrics.profile` on the rows (no CKA
        matrix, no TwoNN); ``config`` holds ``alpha``, ``n_samples`` and
        ``streamed=True``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> def batches():
    ...     for _ in range(5):
    ...         x = rng.normal(size=(100, 3, 8)); x[:, 1] = x[:, 1, :1]  # layer 1: one direction
    ...         yield x
    >>> prof = streaming_profile(batches(), show_progress=False)
    >>> prof.ranking("effective_rank")[-1], prof.config["n_samples"]
    (1, 500)
    """
    wanted = _check_metrics(metrics)
    if isinstance(source, LayerMoments):
        moments = source
    elif isinstance(source, Iterable) and not isinstance(source, (str, bytes)):
        moments = LayerMoments().consume(
            progress(source, show_progress, desc="moments", unit="batch")
        )
    else:
        raise LOESError(
            "source must be a loes.stats.LayerMoments or an iterable of batches; "
            f"got {type(source).__name__}"
        )
    if moments.n == 0:
        raise LOESError("no rows to profile: the moments are empty or the stream gave no batches")
    if layer_names is not None and len(layer_names) != len(moments):
        raise LOESError(f"layer_names has {len(layer_names)} names for {len(moments)} layers")
    per_layer = [
        covariance_metrics(m, alpha=alpha, metrics=wanted)
        for m in progress(moments, show_progress, desc="streamed metrics", unit="layer")
    ]
    values = {name: [v[name] for v in per_layer] for name in STREAMING_METRICS if name in wanted}
    return MetricProfile(
        values=values,
        directions={name: METRICS[name].direction for name in values},
        layer_names=list(layer_names) if layer_names is not None else None,
        config={"alpha": alpha, "n_samples": moments.n, "streamed": True},
    )
