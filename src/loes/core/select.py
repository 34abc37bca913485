"""``select_layers_from_custom_embeddings``: the public entry point of the engine."""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch

from loes._exceptions import LOESError, LOESWarning
from loes._progress import ProgressSetting, verbose_logger
from loes._validation import check_embeddings, check_k, check_targets, normalize_task
from loes.result import LOESResult

__all__ = ["DEFAULTS", "select_layers_from_custom_embeddings"]

logger = logging.getLogger(__name__)

#: Default hyper-parameters of each preset. ``reference`` holds the published
#: values; ``robust`` values were chosen on the benchmark suite (docs/core.md).
DEFAULTS: Dict[str, Dict[str, float]] = {
    "reference": {"reg": 1e-3, "alpha": 1.0, "gamma": 0.5, "eta": 0.1},
    "robust": {"reg": 1.0, "alpha": 0.1, "gamma": 0.1, "eta": 0.05, "orth_reg": 1.0},
}



def select_layers_from_custom_embeddings(
    embeddings: Any,
    targets: Any = None,
    k: Optional[int] = None,
    *,
    task: str = "classification",
    preset: str = "robust",
    reg: Optional[float] = None,
    alpha: Optional[float] = None,
    gamma: Optional[float] = None,
    eta: Optional[float] = None,
    random_state: Optional[int] = 0,
    show_progress: ProgressSetting = "auto",
    verbose: bool = False,
    logger: Optional[logging.Logger] = None,
    layer_names: Optional[Sequence[str]] = None,
    pooling: str = "precomputed",
    dataset: Any = None,
    model_name: Optional[str] = None,
    ignore_index: Optional[int] = -100,
    **options: Any,
) -> LOESResult:
    """Select ``k`` complementary layers from precomputed embeddings.

    Parameters
    ----------
    embeddings : array or tensor of shape (n_samples, n_layers, dim), or a
        sequence of n_layers arrays of shape (n_samples, dim_l)
        Calibration features of each layer. numpy or torch, any float dtype
        (fp16/bf16 included), CPU or CUDA (the computation runs where the data is).
    targets : array of shape (n_samples,) or (n_samples, m), optional
        Classification: labels of any values (ints, strings; ``-100`` is
        dropped as ignore index), or a one-hot / soft-label matrix.
        Regression: numbers. Not used for ``task="label_free"``.
    k : int
        Number of layers to select, ``1 <= k <= n_layers``.
    task : {"classification", "regression", "label_free"}
    preset : {"robust", "reference"}
        ``"robust"`` (default) is scale-free, uses an out-of-sample fit and
        bounded geometry terms; ``"reference"`` reproduces the published formulas.
    reg, alpha, gamma, eta : float, optional
        Ridge strength and the isotropy, redundancy and class-geometry weights
        (the published keyword names; ``beta`` is accepted for ``gamma``).
        ``None`` takes the preset's default (:data:`DEFAULTS`).
    random_state : int, optional
        Seed for the only random step (sampled class triplets when there are
        more than 20 classes). The global RNG is never touched.
    show_progress : bool or {"auto", "on", "off"}
        ``"auto"`` shows tqdm bars only on an interactive terminal.
    verbose : bool
        Log each step (to stderr if the application configured no logging).
    layer_names, pooling, dataset, model_name
        Provenance stored in the result.
    **options
        Settings of the robust preset: ``cv`` ("gcv", default, or "loo": the
        out-of-sample estimate of the fit term), ``standardize`` (True: unit
        variance per feature), ``orth_reg`` (relative ridge of the
        orthogonalisation), ``orth_rank`` (directions kept per selected layer),
        ``cka_samples`` (rows used for CKA), ``cka_debiased``, ``fallback``
        ("none" or "marginal"). See docs/core.md.

    Returns
    -------
    LOESResult
        ``selected_layers`` in pick order, ``layer_scores`` at pick time, and
        the full per-step score table in ``steps``.

    Examples
    --------
    >>> import torch
    >>> from loes import select_layers_from_custom_embeddings
    >>> g = torch.Generator().manual_seed(0)
    >>> y = torch.arange(200) % 4
    >>> x = torch.randn(200, 6, 32, generator=g)
    >>> x[:, 4, :4] += 3 * torch.nn.functional.one_hot(y, 4)   # layer 4 carries the labels
    >>> select_layers_from_custom_embeddings(x, y, k=2, show_progress=False).selected_layers[0]
    4
    """
    log = verbose_logger(logger or globals()["logger"], verbose)
    t_start = time.perf_counter()
    task = normalize_task(task)
    if preset not in DEFAULTS:
        raise LOESError(f"preset must be one of {sorted(DEFAULTS)}; got {preset!r}")
    if "beta" in options:  # the paper's name for the redundancy weight
        if gamma is not None:
            raise LOESError("pass either 'beta' or 'gamma', not both")
        gamma = options.pop("beta")
    params = dict(DEFAULTS[preset])
    for name, value in (("reg", reg), ("alpha", alpha), ("gamma", gamma), ("eta", eta)):
        if value is not None:
            if not float(value) >= 0:
                raise LOESError(f"{name} must be a non-negative number; got {value!r}")
            params[name] = float(value)
    if preset == "robust":
        if "orth_reg" in options:
            params["orth_reg"] = float(options.pop("orth_reg"))
    if params["reg"] <= 0:
        raise LOESError(f"reg must be positive; got {params['reg']}")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LOESWarning)
        layers = check_embeddings(embeddings)
        n_layers = len(layers)
        k = check_k(k, n_layers)
        if layer_names is not None and len(layer_names) != n_layers:
            raise LOESError(f"layer_names has {len(layer_names)} names for {n_layers} layers")
        tgt = None
        if task == "label_free":
            if targets is not None:
                log.info("task='label_free': targets are ignored")
        else:
            tgt = check_targets(targets, task, layers[0].shape[0], ignore_index=ignore_index)
            if tgt.keep is not None:
                keep = tgt.keep.to(layers[0].device)
                layers = [layer[keep] for layer in layers]
        n = layers[0].shape[0]
        if n < 3:
            raise LOESError(f"LOES needs at least 3 labelled calibration samples; got {n}")
        dims = [layer.shape[1] for layer in layers]
        if n <= max(dims):
            warnings.warn(
                f"N={n} calibration samples <= dimension {max(dims)}: in-sample fits interpolate; "
                + (
                    "the robust preset scores out-of-sample fits (GCV or leave-one-out), which stay honest"
                    if preset == "robust"
                    else "the reference preset's fit term is unreliable here (use preset='robust')"
                ),
                LOESWarning,
                stacklevel=2,
            )
        log.info(
            "LOES %s: task=%s N=%d layers=%d dim=%s k=%d device=%s",
            preset, task, n, n_layers, dims[0] if len(set(dims)) == 1 else dims, k, layers[0].device,
        )
        t_checked = time.perf_counter()
        if preset == "reference":
            from loes.core._reference import run_reference as engine
        else:
            from loes.core._robust import run_robust as engine
        _check_options(engine, preset, options)
        out = engine(
            layers,
            tgt,
            k,
            task=task,
            params=params,
            random_state=random_state,
            show_progress=show_progress,
            log=log,
            **options,
        )
    for w in caught:  # recorded for the result; hand them on to the caller too
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    t_end = time.perf_counter()
    timings = {"validate": t_checked - t_start, **out.timings, "total": t_end - t_start}
    config = {
        "preset": preset,
        "k": k,
        "task": task,
        "random_state": random_state,
        **params,
        **out.config,
    }
    result = LOESResult(
        selected_layers=out.selected,
        layer_scores=out.scores,
        task=task,
        num_layers_seen=n_layers,
        num_calibration_samples=n,
        pooling=pooling,
        dataset=dataset,
        model_name=model_name,
        preset=preset,
        steps=out.steps,
        config=config,
        timings=timings,
        layer_names=list(layer_names) if layer_names is not None else None,
        excluded_layers=out.excluded,
        warnings=[str(w.message) for w in caught],
    )
    log.info("LOES selected layers %s (scores %s) in %.3fs", out.selected,
             [round(s, 4) for s in out.scores], timings["total"])
    return result


_ENGINE_ARGS = {"layers", "tgt", "k", "task", "params", "random_state", "show_progress", "log"}


def _check_options(engine, preset: str, options: Dict[str, Any]) -> None:
    """A clear error for an option the preset does not have (not a bare TypeError)."""
    import inspect

    known = [name for name in inspect.signature(engine).parameters if name not in _ENGINE_ARGS]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise LOESError(
            f"unknown option(s) {unknown} for preset={preset!r}; "
            + (f"its options are {sorted(known)}" if known else "it takes no extra options")
        )


class EngineOutput:
    """What an engine returns to :func:`select_layers_from_custom_embeddings`."""

    def __init__(self, selected: List[int], scores: List[float], steps: list, excluded: List[int],
                 timings: Dict[str, float], config: Dict[str, Any]):
        self.selected = selected
        self.scores = scores
        self.steps = steps
        self.excluded = excluded
        self.timings = timings
        self.config = config


def compute_dtype(layers: List[torch.Tensor]) -> torch.dtype:
    """float64 for float64 input, else float32 (fp16/bf16 are upcast)."""
    return torch.float64 if layers[0].dtype == torch.float64 else torch.float32
