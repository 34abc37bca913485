"""Label-free layer selectors: LOES label-free and "best layer by metric"."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from loes._exceptions import LOESError
from loes._validation import check_k
from loes.core import select_layers_from_custom_embeddings
from loes.metrics._profile import METRICS, MetricProfile, _check_direction, profile
from loes.result import LOESResult, StepTable

__all__ = ["LABEL_FREE_METHODS", "best_layer_by_metric", "layer_scores", "select_layers_label_free"]

#: Every ``method`` of :func:`select_layers_label_free`.
LABEL_FREE_METHODS = ("loes",) + tuple(METRICS)

_ZERO_TERMS = ("fit", "isotropy", "redundancy", "geometry")


def select_layers_label_free(
    embeddings: Any = None,
    k: int = 1,
    method: str = "loes",
    *,
    tokens: Any = None,
    views: Any = None,
    direction: str | None = None,
    metric_profile: MetricProfile | None = None,
    alpha: float = 1.0,
    random_state: int = 0,
    layer_names: Sequence[str] | None = None,
    show_progress: Any = "auto",
    **loes_options: Any,
) -> LOESResult:
    """Choose ``k`` layers without labels.

    Parameters
    ----------
    embeddings : array of shape (n_samples, n_layers, dim) or list of layers
        Pooled states (needed by ``"loes"`` and the pooled metrics).
    k : int
        Number of layers.
    method : str
        ``"loes"`` (isotropy and redundancy: LOES with ``task="label_free"``)
        or a metric name from :data:`loes.metrics.METRICS`: the k best layers
        by that metric.
    tokens, views
        Token states or augmented views for the metrics that need them (as in
        :func:`loes.metrics.profile`).
    direction : {"higher", "lower"}, optional
        Override the metric's default direction (``METRICS[name].direction``).
    metric_profile : MetricProfile, optional
        Reuse already computed values instead of recomputing.
    alpha : float
        Rényi order of the entropies.
    **loes_options
        Passed to :func:`loes.select_layers_from_custom_embeddings` for
        ``method="loes"`` (``preset``, ``gamma``, ...).

    Returns
    -------
    LOESResult
        ``task="label_free"``. For a metric: ``method`` is its name (``preset``
        None), ``selected_layers`` are the top k
        by the metric, ``layer_scores`` the signed score (lower is better: the
        value itself for ``"lower"``, its negative for ``"higher"``), one
        :class:`StepTable` per pick whose terms hold the metric values and the
        signed ``"total"``, and ``config`` names the metric and direction.

    Examples
    --------
    >>> import torch
    >>> x = torch.randn(300, 3, 16, generator=torch.Generator().manual_seed(0))
    >>> x[:, 0, 2:] = 0; x[:, 1, 8:] = 0   # layers 0 and 1 use 2 and 8 of 16 directions
    >>> res = select_layers_label_free(x, k=2, method="effective_rank", show_progress=False)
    >>> res.selected_layers, res.config["direction"]
    ([2, 1], 'higher')
    """
    if method == "loes":
        if embeddings is None:
            raise LOESError("method='loes' needs pooled embeddings")
        return select_layers_from_custom_embeddings(
            embeddings,
            None,
            k,
            task="label_free",
            random_state=random_state,
            layer_names=layer_names,
            show_progress=show_progress,
            **loes_options,
        )
    if method not in METRICS:
        raise LOESError(f"method must be one of {list(LABEL_FREE_METHODS)}; got {method!r}")
    if loes_options:
        raise LOESError(f"options {sorted(loes_options)} only apply to method='loes'")
    t0 = time.perf_counter()
    direction = _check_direction(direction or METRICS[method].direction)
    prof = metric_profile
    if prof is None or method not in prof.values:
        prof = profile(
            embeddings,
            tokens=tokens,
            views=views,
            metrics=[method],
            alpha=alpha,
            random_state=random_state,
            with_cka=False,
            layer_names=layer_names,
            show_progress=show_progress,
        )
    values = prof.values[method]
    n_layers = len(values)
    k = check_k(k, n_layers)
    order = prof.ranking(method, direction)
    valid = [i for i in order if values[i] == values[i]]
    if len(valid) < k:
        raise LOESError(f"{method} is defined for only {len(valid)} layers; cannot pick k={k}")
    sign = 1.0 if direction == "lower" else -1.0
    selected: list[int] = valid[:k]
    steps = []
    for step, layer in enumerate(selected, 1):
        candidates = [i for i in range(n_layers) if i not in selected[: step - 1]]
        terms = {name: [0.0] * len(candidates) for name in _ZERO_TERMS}
        terms[method] = [values[i] for i in candidates]
        terms["total"] = [sign * values[i] for i in candidates]
        steps.append(StepTable(step=step, selected=layer, candidates=candidates, terms=terms))
    n_samples = _n_samples(embeddings, views)
    return LOESResult(
        selected_layers=selected,
        layer_scores=[sign * values[i] for i in selected],
        task="label_free",
        num_layers_seen=n_layers,
        num_calibration_samples=n_samples,
        pooling="tokens" if METRICS[method].source == "tokens" else "precomputed",
        preset=None,
        method=method,
        steps=steps,
        config={
            "method": method,
            "metric": method,
            "direction": direction,
            "k": k,
            "random_state": random_state,
            **prof.config,
        },
        timings={"total": time.perf_counter() - t0},
        layer_names=list(layer_names) if layer_names is not None else prof.layer_names,
    )


def best_layer_by_metric(
    embeddings: Any = None,
    metric: str = "dataset_entropy",
    *,
    direction: str | None = None,
    **kwargs: Any,
) -> LOESResult:
    """The single best layer by ``metric`` (``k=1`` of :func:`select_layers_label_free`).

    The metric's default direction is ``METRICS[metric].direction``; pass
    ``direction`` to override it. ``result.selected_layers[0]`` is the layer.
    """
    if metric == "loes":
        raise LOESError("use select_layers_label_free(method='loes') for LOES label-free")
    return select_layers_label_free(embeddings, 1, metric, direction=direction, **kwargs)


def layer_scores(
    embeddings: Any,
    metric: str,
    *,
    direction: str | None = None,
    random_state: int = 0,
    **kwargs: Any,
) -> list[float]:
    """One score per layer for ``metric``, signed so that lower is better.

    The metric's value for ``"lower"`` metrics and its negative for
    ``"higher"`` ones (``direction`` overrides the default). ``kwargs`` go to
    :func:`loes.metrics.profile` (``tokens``, ``views``, ``alpha``, ...).

    >>> import torch
    >>> x = torch.randn(100, 2, 8, generator=torch.Generator().manual_seed(0))
    >>> x[:, 1, 1:] = 0
    >>> s = layer_scores(x, "effective_rank")
    >>> s[0] < s[1]
    True
    """
    if metric not in METRICS:
        raise LOESError(f"metric must be one of {list(METRICS)}; got {metric!r}")
    direction = _check_direction(direction or METRICS[metric].direction)
    kwargs.setdefault("show_progress", False)
    prof = profile(
        embeddings, metrics=[metric], random_state=random_state, with_cka=False, **kwargs
    )
    sign = 1.0 if direction == "lower" else -1.0
    return [sign * v for v in prof.values[metric]]


def _n_samples(embeddings: Any, views: Any) -> int:
    for x in (embeddings, views[0] if views is not None else None):
        if x is not None:
            return int(len(x[0]) if isinstance(x, (list, tuple)) else x.shape[0])
    return 0
