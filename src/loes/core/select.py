"""``select_layers_from_custom_embeddings``: the public entry point of the engine."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import torch

from loes._estimate import CrossValidation, calibration_cv, choose_layers, standard_sets
from loes._exceptions import LOESError, LOESWarning
from loes._progress import ProgressSetting, verbose_logger
from loes._rng import RandomState, seed_of
from loes._validation import (
    Targets,
    check_embeddings,
    check_k,
    check_targets,
    normalize_task,
)
from loes.core._engine import (
    DEFAULTS,
    EngineOutput,
    check_finite_output,
    make_options,
    seed_is_given,
)
from loes.core._reference import run_reference
from loes.core._robust import run_robust
from loes.result import LOESResult
from loes.store import FeatureStore

__all__ = ["AUTO_MAX_K", "DEFAULTS", "select_layers_from_custom_embeddings"]

logger = logging.getLogger(__name__)


def select_layers_from_custom_embeddings(
    embeddings: Any,
    targets: Any = None,
    k: int | None = None,
    *,
    task: str = "classification",
    preset: str = "robust",
    reg: float | None = None,
    alpha: float | None = None,
    gamma: float | None = None,
    eta: float | None = None,
    random_state: RandomState = 0,
    show_progress: ProgressSetting = "auto",
    verbose: bool = False,
    logger: logging.Logger | None = None,
    layer_names: Sequence[str] | None = None,
    pooling: str = "precomputed",
    dataset: Any = None,
    model_name: str | None = None,
    ignore_index: int | None = -100,
    estimate: bool = True,
    eval_embeddings: Any = None,
    eval_targets: Any = None,
    **options: Any,
) -> LOESResult:
    """Select ``k`` complementary layers from precomputed embeddings.

    Parameters
    ----------
    embeddings : array or tensor of shape (n_samples, n_layers, dim), or a
        sequence of n_layers arrays of shape (n_samples, dim_l)
        Calibration features of each layer. numpy or torch, any real float dtype
        (fp16/bf16 included), CPU or CUDA (the computation runs where the data is).
        A list or tuple of arrays/tensors is a list of layers; a nested list of
        numbers is read with ``np.asarray`` and must be 3-D (n_samples, n_layers, dim).
        A :class:`~loes.store.FeatureStore` (:func:`loes.load_features`) is read into
        memory with its targets (unless ``targets`` is given) and its layers named by
        the model's names (index ``j`` is the store's ``j``-th layer).
    targets : array of shape (n_samples,) or (n_samples, m), optional
        Classification: labels of any values (ints, strings; ``-100`` is
        dropped as ignore index), or a one-hot / soft-label matrix.
        Regression: numbers. Not used for ``task="label_free"``.
    k : int or "auto"
        Number of layers to select, ``1 <= k <= n_layers``, or ``"auto"``:
        LOES orders up to :data:`AUTO_MAX_K` layers, then the cross-validated
        probe (:mod:`loes._estimate`) picks the smallest set among the last layer
        alone and the prefixes of that order whose score is within a quarter of
        a paired standard error of the best (ties in size go to the last layer). The
        comparison is in ``config["k_auto"]``. Needs targets.
    task : {"classification", "regression", "label_free"}
    preset : {"robust", "reference"}
        ``"robust"`` (default) is scale-free, uses an out-of-sample fit and
        bounded geometry terms; ``"reference"`` reproduces the published formulas.
    reg, alpha, gamma, eta : float, optional
        Ridge strength and the isotropy, redundancy and class-geometry weights
        (the published keyword names; ``beta`` is accepted for ``gamma``).
        ``None`` takes the preset's default (:data:`DEFAULTS`).
    random_state : None, int, numpy Generator/RandomState or torch.Generator
        Seed for the random steps (sampled class triplets above 20 classes,
        CKA rows, randomised range finder), scikit-learn's conventions
        (:func:`loes._rng.check_random_state`; None: fresh randomness). The
        global RNG is never touched; ``config["seed"]`` records the seed used.
    show_progress : bool or {"auto", "on", "off"}
        ``"auto"``: a tqdm bar on a terminal, log lines with rate and ETA elsewhere
        (:func:`loes._progress.progress`).
    verbose : bool
        Log each step (to stderr if the application configured no logging).
    layer_names, pooling, dataset, model_name
        Provenance stored in the result.
    estimate : bool
        Attach ``result.estimate`` (not for ``task="label_free"``): repeated
        K-fold cross-validation on the calibration rows (at most
        :data:`~loes._estimate.ESTIMATE_MAX_ROWS`, a stratified sample beyond) of
        one ridge probe on the picked layers, the last layer, the last-k layers
        and all layers, with paired differences; ``result.estimate.verdict()``
        says whether the pick beats the last layer.
    eval_embeddings : array or tensor of shape (n_eval, n_layers, dim), or a sequence of
        n_layers arrays of shape (n_eval, dim_l), optional
        Held-out rows for the estimate instead of the calibration rows: the same
        layers and widths as ``embeddings``. The probe is cross-validated within
        these rows (repeated K-fold, trained and scored on them); the selection
        and ``k="auto"`` still use the calibration rows only.
    eval_targets : array of shape (n_eval,) or (n_eval, m), optional
        Targets of ``eval_embeddings``, of the same kind as ``targets`` (every
        class label must occur in the calibration targets). Both are checked
        before the selection runs.
    **options
        Settings of the robust preset (:class:`loes.core._engine.RobustOptions`):
        ``cv`` ("gcv", default, or "loo": the out-of-sample estimate of the fit
        term), ``standardize`` (True: unit variance per feature), ``orth_reg``
        (relative ridge of the orthogonalisation), ``orth_rank`` (directions
        kept per selected layer), ``cka_samples`` (rows used for CKA, an int
        >= 4 or None for all), ``cka_debiased``. All options are validated
        before the data are read; an unknown name is an error with a hint.

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
    # everything cheap first: task, options, k, random_state; then the data
    task = normalize_task(task)
    published = {
        name: v
        for name, v in (("reg", reg), ("alpha", alpha), ("gamma", gamma), ("eta", eta))
        if v is not None
    }
    opts = make_options(preset, **published, **options)
    auto = isinstance(k, str) and k == "auto"
    if auto and task == "label_free":
        raise LOESError(
            "k='auto' chooses the number of layers by a probe on the targets; "
            "task='label_free' has none: give an int k"
        )
    if not isinstance(estimate, (bool, np.bool_)):
        raise LOESError(f"estimate must be True or False; got {estimate!r}")
    if not auto:
        check_k(k)
    held_out = eval_embeddings is not None or eval_targets is not None
    if held_out:
        _check_eval_request(eval_embeddings, eval_targets, task, bool(estimate))
    seed = seed_of(random_state)
    if layer_names is not None and (
        isinstance(layer_names, str) or not isinstance(layer_names, Sequence)
    ):
        raise LOESError(
            f"layer_names must be a sequence of names; got {type(layer_names).__name__}"
        )

    if isinstance(embeddings, FeatureStore):  # a calibration store: its rows, targets, names
        store = embeddings
        embeddings, stored_targets = store.load()
        targets = stored_targets if targets is None else targets
        layer_names = store.stored_names if layer_names is None else layer_names
        dataset = dataset or str(store.path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LOESWarning)
        layers = check_embeddings(embeddings)
        n_layers = len(layers)
        k = min(AUTO_MAX_K, n_layers) if auto else check_k(k, n_layers)
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
        if n <= max(dims) and preset == "reference":
            warnings.warn(
                f"N={n} calibration samples <= dimension {max(dims)}: in-sample fits interpolate; "
                "the reference preset's fit term is unreliable here (use preset='robust')",
                LOESWarning,
                stacklevel=2,
            )
        elif n <= max(dims):  # normal for the robust preset: its fit is out of sample
            log.info(
                "N=%d <= dimension %d: the robust preset scores out-of-sample fits", n, max(dims)
            )
        log.info(
            "LOES %s: task=%s N=%d layers=%d dim=%s k=%d device=%s",
            preset,
            task,
            n,
            n_layers,
            dims[0] if len(set(dims)) == 1 else dims,
            k,
            layers[0].device,
        )
        eval_cv = (
            _eval_cv(eval_embeddings, eval_targets, layers, tgt, task, seed, ignore_index)
            if held_out
            else None
        )
        t_checked = time.perf_counter()
        engine = run_reference if preset == "reference" else run_robust
        try:
            out = engine(
                layers,
                tgt,
                k,
                task=task,
                opts=opts,
                seed=seed,
                show_progress=show_progress,
                log=log,
            )
        except torch.linalg.LinAlgError as e:  # a factorisation failed: never a bare torch error
            raise LOESError(
                f"the {preset} preset could not factorise the features ({e}); the data are numerically "
                "degenerate (huge offsets or scales?): rescale or centre the layers, or pass float64"
            ) from e
        check_finite_output(out, preset)
        t_selected = time.perf_counter()
        cv, auto_record, skipped = None, None, None
        if tgt is not None and (auto or (estimate and eval_cv is None)):
            try:
                cv = calibration_cv(layers, tgt, task, seed)
            except LOESError as e:  # too few rows for any cross-validation
                if auto:
                    raise LOESError(
                        f"k='auto' cannot cross-validate these targets: {e}; give an int k"
                    ) from e
                skipped = str(e)
                log.info("no estimate: %s", e)
        if auto:
            out, auto_record = _choose_prefix(out, cv, n_layers, log)
            k = len(out.selected)
        est_cv = eval_cv if eval_cv is not None else cv
        est = (
            est_cv.estimate(standard_sets(out.selected, n_layers))
            if est_cv is not None and estimate
            else None
        )
        if est is not None:
            log.info("estimate: %s", est.verdict())
    for w in caught:  # recorded for the result; hand them on to the caller too
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    t_end = time.perf_counter()
    timings = {"validate": t_checked - t_start, **out.timings}
    if cv is not None or eval_cv is not None:
        timings["estimate"] = t_end - t_selected
    timings["total"] = t_end - t_start
    config = {
        "preset": preset,
        "k": "auto" if auto else k,
        "task": task,
        "random_state": int(random_state) if seed_is_given(random_state) else None,
        "seed": seed,
        **asdict(opts),
        **out.config,
    }
    if auto_record is not None:
        config["k_auto"] = auto_record
    if skipped is not None:
        config["estimate_skipped"] = skipped
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
        estimate=est,
    )
    log.info(
        "LOES selected layers %s (scores %s) in %.3fs",
        out.selected,
        [round(s, 4) for s in out.scores],
        timings["total"],
    )
    return result


#: Most layers ``k="auto"`` considers (the LOES order is computed this far).
AUTO_MAX_K = 8


def _choose_prefix(
    out: EngineOutput, cv: CrossValidation, n_layers: int, log
) -> tuple[EngineOutput, dict]:
    """``k="auto"``: cut the LOES order where the cross-validated probe says to
    (:func:`loes._estimate.choose_layers`)."""
    last = n_layers - 1
    chosen, record = choose_layers(cv, list(out.selected), last)
    log.info("k='auto': %s -> layers %s (best %s)", record["chosen"], chosen, record["best"])
    if record["chosen"] == "last":
        step1 = out.steps[0]
        score = (
            step1.terms["total"][step1.candidates.index(last)]
            if last in step1.candidates
            else float("nan")
        )
        return replace(out, selected=[last], scores=[score], steps=out.steps[:1]), record
    j = len(chosen)
    return replace(out, selected=chosen, scores=out.scores[:j], steps=out.steps[:j]), record


def _check_eval_request(eval_embeddings: Any, eval_targets: Any, task: str, estimate: bool) -> None:
    """The checks of ``eval_embeddings`` / ``eval_targets`` that need no data."""
    if eval_embeddings is None or eval_targets is None:
        given, missing = (
            ("eval_embeddings", "eval_targets")
            if eval_targets is None
            else ("eval_targets", "eval_embeddings")
        )
        raise LOESError(
            f"{given} was given without {missing}: the estimate on held-out rows needs both"
        )
    if task == "label_free":
        raise LOESError(
            "eval_embeddings/eval_targets feed the estimate, which scores a probe on targets; "
            "task='label_free' has none: drop them"
        )
    if not estimate:
        raise LOESError(
            "eval_embeddings/eval_targets feed result.estimate, and estimate=False turns it off: "
            "drop one or the other"
        )


def _eval_cv(
    eval_embeddings: Any,
    eval_targets: Any,
    layers: Sequence[torch.Tensor],
    tgt: Targets,
    task: str,
    seed: int,
    ignore_index: int | None,
) -> CrossValidation:
    """The estimate's cross-validation on the caller's held-out rows, checked against the
    calibration inputs (layers, widths, target kind and classes) before any selection."""
    try:
        ev = check_embeddings(eval_embeddings)
    except LOESError as e:
        raise LOESError(f"eval_embeddings: {e}") from e
    widths, ev_widths = [x.shape[1] for x in layers], [x.shape[1] for x in ev]
    if len(ev) != len(layers):
        raise LOESError(
            f"eval_embeddings has {len(ev)} layers, the calibration embeddings {len(layers)}: "
            "pass the same layers of the same model for both"
        )
    if ev_widths != widths:
        i = next(i for i, (a, b) in enumerate(zip(widths, ev_widths)) if a != b)
        raise LOESError(
            f"eval_embeddings layer {i} has width {ev_widths[i]}, the calibration layer {widths[i]}: "
            "pass the same layers (and pooling) for both"
        )
    n_eval = ev[0].shape[0]
    try:
        ev_tgt = check_targets(eval_targets, task, n_eval, ignore_index=ignore_index)
    except LOESError as e:
        raise LOESError(f"eval_targets: {e}") from e
    if ev_tgt.keep is not None:
        ev = [x[ev_tgt.keep.to(x.device)] for x in ev]
    width, ev_width = tgt.y.shape[1], ev_tgt.y.shape[1]
    ndim = eval_targets.ndim if hasattr(eval_targets, "ndim") else np.ndim(eval_targets)
    if task == "classification" and ndim == 1:  # labels: map onto the calibration's classes
        where = {c: i for i, c in enumerate(tgt.classes)}
        unseen = [c for c in ev_tgt.classes if c not in where]
        if unseen:
            raise LOESError(
                f"eval_targets has {len(unseen)} label(s) the calibration targets do not have "
                f"({unseen[:5]}; calibration classes {tgt.classes[:10]}): drop those rows, or "
                "add them to the calibration set"
            )
        labels = torch.tensor([where[c] for c in ev_tgt.classes])[ev_tgt.labels]
        ev_tgt = Targets(
            y=torch.nn.functional.one_hot(labels, width).double(),
            labels=labels,
            classes=tgt.classes,
            keep=None,
        )
    elif ev_width != width:
        kind = "classes (columns)" if task == "classification" else "target columns"
        raise LOESError(
            f"eval_targets has {ev_width} {kind}, the calibration targets {width}: "
            "pass targets of the same kind for both"
        )
    try:
        return calibration_cv(ev, ev_tgt, task, seed, rows="eval")
    except LOESError as e:
        raise LOESError(
            f"the eval rows cannot be cross-validated: {e}; pass more held-out rows, or "
            "drop eval_embeddings/eval_targets to cross-validate the calibration rows"
        ) from e
