"""Baseline layer selectors behind the selector interface.

Every baseline returns a :class:`~loes.result.LOESResult`, like
:func:`loes.select_layers_from_custom_embeddings`, with ``method`` set to the
baseline's name (``preset`` is None: that is LOES's) and ``config["head"]``
saying what to train on the result; the fixed baselines (``last``, ``last_k``,
``all_concat``, ``layer_weights``, ``random_k``) score nothing, so their
``layer_scores`` are NaN:

=================  ===========================================  =================
name               layers                                       head
=================  ===========================================  =================
``last``           the last layer                               ``concat``
``last_k``         the last k layers                            ``concat``
``all_concat``     every layer                                  ``concat``
``layer_weights``  every layer                                  ``layer_weights``
``random_k``       k layers drawn with ``random_state``         ``concat``
``greedy_probe``   top k by single-layer probe accuracy         ``concat``
``exhaustive``     best k-subset by probe accuracy              ``concat``
``label_free``     top k by a label-free metric                 ``concat``
=================  ===========================================  =================

``concat`` means a probe on the concatenated layers; ``layer_weights`` means
learnable softmax weights over the layers followed by a linear head
(:class:`~loes.transfer.FusionProbe` with ``hidden=None, fusion="weighted"``).

The probe accuracy of ``greedy_probe`` and ``exhaustive`` is the exact
leave-one-out accuracy (classification; relative LOO error for regression) of
a ridge probe on the calibration data, each layer standardised — one
closed-form computation per candidate, no refits.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from loes._exceptions import LOESError
from loes._linalg import LayerStandardizer, RidgePath, ridge_loo_residuals
from loes._progress import ProgressSetting, progress
from loes._rng import check_random_state
from loes._validation import check_embeddings, check_k, check_targets, normalize_task
from loes.metrics import LABEL_FREE_METHODS, select_layers_label_free
from loes.result import LOESResult, StepTable

__all__ = [
    "BASELINES",
    "HEADS",
    "loo_probe_error",
    "select_baseline",
]

logger = logging.getLogger(__name__)

#: Baseline names, in the order the evaluation reports them.
BASELINES = (
    "last",
    "last_k",
    "all_concat",
    "layer_weights",
    "random_k",
    "greedy_probe",
    "exhaustive",
    "label_free",
)

#: The head each baseline asks the evaluation to train.
HEADS = {name: "concat" for name in BASELINES}
HEADS["layer_weights"] = "layer_weights"

#: Refuse exhaustive search above this many k-subsets unless told otherwise.
MAX_COMBINATIONS = 5000


def _standardize(layer: torch.Tensor) -> torch.Tensor:
    x = layer.detach().to("cpu", torch.float64)
    return LayerStandardizer().fit([x]).transform([x])


def loo_probe_error(
    layers: Sequence[torch.Tensor], y: torch.Tensor, labels: torch.Tensor | None, reg: float = 1e-1
) -> tuple[float, float]:
    """Leave-one-out error of a ridge probe on the concatenation of ``layers``.

    Parameters
    ----------
    layers : sequence of tensors of shape (n_samples, dim_l)
        Already standardised (each feature centred and scaled).
    y : tensor of shape (n_samples, m)
        One-hot labels (classification) or regression targets.
    labels : tensor of shape (n_samples,) or None
        Integer class ids for classification; None for regression.
    reg : float
        Ridge strength relative to the mean non-zero eigenvalue.

    Returns
    -------
    (error, mse)
        ``error`` is the LOO misclassification rate (classification) or the
        LOO mean squared error divided by the target variance (regression);
        ``mse`` is the LOO mean squared error (a tie-breaker).
    """
    x = torch.cat(list(layers), dim=1)
    return _loo_error(ridge_loo_residuals(x, y, reg=reg, relative=True), y, labels)


def _loo_error(
    resid: torch.Tensor, y: torch.Tensor, labels: torch.Tensor | None
) -> tuple[float, float]:
    """(misclassification rate or relative MSE, MSE) of the LOO residuals ``resid`` (N, m)."""
    mse = float((resid**2).mean())
    if labels is None:
        var = float(((y - y.mean(0, keepdim=True)) ** 2).mean())
        return mse / var if var > 0 else 0.0, mse
    return float(((y - resid).argmax(1) != labels).double().mean()), mse


def _kernel_loo_error(
    kernel: torch.Tensor, dim: int, y: torch.Tensor, labels: torch.Tensor | None, reg: float
) -> tuple[float, float]:
    """:func:`loo_probe_error` from the summed centred kernel of the layers (dual form,
    :class:`~loes._linalg.RidgePath` with ``kernel``): no concatenated features."""
    resid = RidgePath(y=y, kernel=kernel, dim=dim).loo_residuals(reg)
    return _loo_error(resid, y, labels)


def _result(
    name: str,
    selected: list[int],
    scores: list[float],
    n_layers: int,
    n: int,
    task: str,
    k: int,
    steps: list[StepTable],
    config: dict[str, Any],
    t0: float,
    layer_names: Sequence[str] | None,
) -> LOESResult:
    return LOESResult(
        selected_layers=[int(i) for i in selected],
        layer_scores=[float(s) for s in scores],
        task=task,
        num_layers_seen=n_layers,
        num_calibration_samples=n,
        pooling="precomputed",
        preset=None,
        method=name,
        steps=steps,
        config={"method": name, "head": HEADS[name], "k": k, **config},
        timings={"total": time.perf_counter() - t0},
        layer_names=list(layer_names) if layer_names is not None else None,
    )


def _error_table(
    errors: list[tuple[float, float]], candidates: list[int], selected: int
) -> StepTable:
    zeros = [0.0] * len(candidates)
    fit = [e for e, _ in errors]
    return StepTable(
        step=1,
        selected=selected,
        candidates=list(candidates),
        terms={
            "fit": fit,
            "isotropy": zeros,
            "redundancy": list(zeros),
            "geometry": list(zeros),
            "total": list(fit),
        },
    )


def select_baseline(
    name: str,
    embeddings: Any,
    targets: Any = None,
    k: int | None = None,
    *,
    task: str = "classification",
    random_state: int | None = 0,
    reg: float = 1e-1,
    max_combinations: int = MAX_COMBINATIONS,
    metric: str = "dataset_entropy",
    show_progress: ProgressSetting = False,
    layer_names: Sequence[str] | None = None,
) -> LOESResult:
    """Select layers with a baseline method.

    Parameters
    ----------
    name : str
        One of :data:`BASELINES`.
    embeddings : array of shape (n_samples, n_layers, dim) or list of (n_samples, dim_l)
        Calibration features.
    targets : array of shape (n_samples,) or (n_samples, m), optional
        Needed by ``greedy_probe`` and ``exhaustive``.
    k : int
        Layer budget (ignored by ``last``, ``all_concat`` and ``layer_weights``).
    task : {"classification", "regression"}
    random_state : int, optional
        Seed of ``random_k`` (and of label-free metrics that sample).
    reg : float
        Relative ridge strength of the LOO probe used by ``greedy_probe`` and
        ``exhaustive``.
    max_combinations : int
        ``exhaustive`` refuses to enumerate more k-subsets than this.
    metric : str
        The label-free score of ``label_free``: a pooled-embedding metric of
        :mod:`loes.metrics` (``"dataset_entropy"``, ``"effective_rank"``,
        ``"twonn"``, ...; each with its own direction) or ``"loes"`` (LOES
        label-free: isotropy and redundancy).
    show_progress : bool or str
    layer_names : sequence of str, optional

    Returns
    -------
    LOESResult
        ``method`` and ``config["method"]`` are ``name``; ``config["head"]``
        is what the evaluation trains; ``layer_scores`` hold each pick's
        score where the method has one (LOO error, lower is better), NaN
        where it has none (the fixed baselines).

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(60, 6, 4))
    >>> res = select_baseline("last_k", X, k=3)
    >>> res.selected_layers, res.method, res.layer_scores
    ([3, 4, 5], 'last_k', [nan, nan, nan])
    """
    t0 = time.perf_counter()
    if name not in BASELINES:
        raise LOESError(f"unknown baseline {name!r}; choose one of {list(BASELINES)}")
    task = normalize_task(task)
    layers = check_embeddings(embeddings)
    n_layers, n = len(layers), layers[0].shape[0]
    if name in ("last", "all_concat", "layer_weights"):
        k = 1 if name == "last" else n_layers
    k = check_k(k, n_layers)
    common = dict(n_layers=n_layers, n=n, task=task, k=k, t0=t0, layer_names=layer_names)

    unscored = [math.nan] * k
    if name == "last":
        return _result(name, [n_layers - 1], unscored, steps=[], config={}, **common)
    if name == "last_k":
        return _result(
            name, list(range(n_layers - k, n_layers)), unscored, steps=[], config={}, **common
        )
    if name in ("all_concat", "layer_weights"):
        return _result(name, list(range(n_layers)), unscored, steps=[], config={}, **common)
    if name == "random_k":
        rng = check_random_state(random_state)
        picked = sorted(int(i) for i in rng.choice(n_layers, size=k, replace=False))
        return _result(
            name, picked, unscored, steps=[], config={"random_state": random_state}, **common
        )
    if name == "label_free":
        return _label_free(metric, layers, k, random_state, show_progress, common)

    # supervised baselines: LOO ridge probe on the calibration data
    if task == "label_free":
        raise LOESError(
            f"baseline {name!r} needs targets and task 'classification' or 'regression'"
        )
    tgt = check_targets(targets, task, n)
    keep = tgt.keep
    std = [_standardize(x if keep is None else x[keep]) for x in layers]
    y, labels = tgt.y, (tgt.labels if task == "classification" else None)
    if task == "classification" and labels is None:
        labels = tgt.y.argmax(1)
    config = {"reg": reg}
    if name == "greedy_probe":
        errors = [
            loo_probe_error([std[i]], y, labels, reg)
            for i in progress(
                range(n_layers),
                show_progress,
                desc="single-layer probes",
                total=n_layers,
                unit="layer",
            )
        ]
        order = sorted(range(n_layers), key=lambda i: (errors[i][0], errors[i][1], i))
        picked = order[:k]
        table = _error_table(errors, list(range(n_layers)), picked[0])
        return _result(
            name, picked, [errors[i][0] for i in picked], steps=[table], config=config, **common
        )

    # exhaustive
    total = math.comb(n_layers, k)
    if total > max_combinations:
        raise LOESError(
            f"exhaustive search over C({n_layers}, {k}) = {total} subsets exceeds "
            f"max_combinations={max_combinations}: raise max_combinations, lower k, "
            "or use 'greedy_probe'"
        )
    best: tuple[float, float] | None = None
    best_subset: tuple[int, ...] = ()
    n_kept = std[0].shape[0]
    # N <= concatenated width: sum the layers' N x N kernels instead of concatenating
    dual = n_kept <= k * min(x.shape[1] for x in std)
    kernels = [x @ x.T for x in std] if dual else None
    for subset in progress(
        itertools.combinations(range(n_layers), k),
        show_progress,
        desc="exhaustive subsets",
        total=total,
        unit="subset",
    ):
        if dual:
            dim = sum(std[i].shape[1] for i in subset)
            err = _kernel_loo_error(sum(kernels[i] for i in subset), dim, y, labels, reg)
        else:
            err = loo_probe_error([std[i] for i in subset], y, labels, reg)
        if best is None or err < best:
            best, best_subset = err, subset
    config.update({"subsets": total, "best_error": best[0]})
    return _result(name, list(best_subset), [best[0]] * k, steps=[], config=config, **common)


def _label_free(
    metric: str,
    layers: list[torch.Tensor],
    k: int,
    random_state: Any,
    show_progress: ProgressSetting,
    common: dict[str, Any],
) -> LOESResult:
    """Top-k by a label-free score (:func:`loes.metrics.select_layers_label_free`)."""
    if metric not in LABEL_FREE_METHODS:
        raise LOESError(
            f"unknown label-free metric {metric!r}; choose one of {list(LABEL_FREE_METHODS)}"
        )
    res = select_layers_label_free(
        layers, k, method=metric, random_state=random_state, show_progress=show_progress
    )
    config = {"metric": metric}
    if "direction" in res.config:
        config["direction"] = res.config["direction"]
    return _result(
        "label_free",
        res.selected_layers,
        res.layer_scores,
        steps=res.steps,
        config=config,
        **common,
    )
