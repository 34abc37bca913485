"""Protocol, probe, oracles and method registry of the quality benchmark.

Importable without any model (tests use it on synthetic data); the runner is
``benchmarks/bench_quality.py``. Layers are lists of (N, D_l) arrays so widths
may differ; a task is ``"classification"`` when the targets are integers and
``"regression"`` when they are floats.

Protocol of one split (see :func:`run_split`):

- rows are split, stratified (classes, or 5 quantile bins of a numeric target),
  into calibration 20 % / train 50 % / test 30 % (:func:`split_indices`);
- a selector (:data:`SELECTORS`) sees the calibration rows only and returns
  layer indices;
- the probe (:func:`probe_score`) is fit on the train rows of the picked
  layers, each layer z-scored with train statistics and the layers
  concatenated, and scored on the test rows: accuracy of a logistic
  regression whose C is chosen from :data:`CS` by 3-fold stratified CV on
  train (classification), R^2 of a GCV ``RidgeCV`` (regression);
- reference columns computed here, not by a selector: ``best_single_cv``
  (the layer with the best 3-fold CV probe score on calibration + train),
  ``oracle_single`` (the best single layer's test score), ``oracle_k_top1``
  (the k-subset with the best test score of a closed-form kernel ridge on the
  summed per-layer linear kernels, :func:`oracle_ranking`, rescored with the
  probe) and ``oracle_k`` (the best probe test score among the
  :data:`ORACLE_RESCORE` best kernel-ridge subsets: the kernel ridge alone
  ranks subsets for a logistic probe only roughly).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from itertools import combinations
from math import comb

import numpy as np

#: Inverse regularisation strengths the logistic probe chooses from (3-fold CV on train).
CS = (0.001, 0.01, 0.1, 1.0)
#: Ridge strengths of the regression probe (GCV on train).
ALPHAS = tuple(np.logspace(-2, 5, 15))
#: Kernel-ridge strengths of the oracle, relative to mean(diag(K_train)); the best on test counts.
ORACLE_LAMBDAS = (1e-2, 1e-1, 1.0, 10.0)
#: Above this many k-subsets the oracle searches greedily instead of exhaustively.
MAX_SUBSETS = 2000
#: The oracle k-subset is the best probe score among this many best kernel-ridge subsets.
ORACLE_RESCORE = 10
#: lbfgs iterations of one logistic fit (warm-started along CS in the CV).
MAX_ITER = 300
FRACTIONS = (0.2, 0.5, 0.3)
#: Version of the protocol's numbers: bump it with any change that alters a result, so
#: bench_quality.py's per-split cache is recomputed.
PROTOCOL = "1"

Layers = Sequence[np.ndarray]
Selector = Callable[[Layers, np.ndarray, int, int], list[int]]


def task_of(y: np.ndarray) -> str:
    """``"classification"`` for integer targets, ``"regression"`` for floats."""
    return "classification" if np.issubdtype(np.asarray(y).dtype, np.integer) else "regression"


# ----------------------------------------------------------------------------- splits
def split_indices(
    y: np.ndarray, seed: int, fractions: tuple[float, float, float] = FRACTIONS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified calibration / train / test rows.

    Parameters
    ----------
    y : ndarray of shape (N,)
        Class labels (integers) or numbers (floats: stratified by 5 quantile bins).
    seed : int
    fractions : (float, float, float)
        Shares of calibration, train and test; rounded per stratum on the
        cumulative shares, so each stratum is split within one row of them.

    Returns
    -------
    cal, train, test : sorted int64 arrays, disjoint, together every row.
    """
    y = np.asarray(y)
    strata = (
        y
        if task_of(y) == "classification"
        else np.digitize(y, np.quantile(y, [0.2, 0.4, 0.6, 0.8]))
    )
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    cuts = np.cumsum(fractions)[:2]
    for s in np.unique(strata):
        rows = rng.permutation(np.flatnonzero(strata == s))
        a, b = np.round(cuts * len(rows)).astype(int)
        for part, chunk in zip(parts, (rows[:a], rows[a:b], rows[b:])):
            part.append(chunk)
    return tuple(np.sort(np.concatenate(p)).astype(np.int64) for p in parts)


# ----------------------------------------------------------------------------- features
def zscore(layers: Layers, fit_rows: np.ndarray) -> list[np.ndarray]:
    """Every layer standardised per feature with the mean and std of ``fit_rows``.

    Constant features (std 0) are centred only. Returns float64 (N, D_l) arrays.
    """
    out = []
    for x in layers:
        x = np.asarray(x, np.float64)
        mu, sd = x[fit_rows].mean(0), x[fit_rows].std(0)
        out.append((x - mu) / np.where(sd > 0, sd, 1.0))
    return out


def concat(layers: Layers, subset: Sequence[int], rows: np.ndarray) -> np.ndarray:
    """(len(rows), sum of D_l) concatenation of the picked layers on some rows."""
    return np.concatenate([layers[i][rows] for i in subset], axis=1)


# ----------------------------------------------------------------------------- probe
def _row_space(xtr: np.ndarray, xte: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in the row space of ``xtr`` when D > n (exact for L2-penalised
    linear models: their weights lie in the span of the training rows)."""
    if xtr.shape[1] <= xtr.shape[0]:
        return xtr, xte
    _, s, vt = np.linalg.svd(xtr, full_matrices=False)
    basis = vt[s > s[0] * 1e-10].T
    return xtr @ basis, xte @ basis


def _logistic(C: float):
    from sklearn.linear_model import LogisticRegression

    # Few hundred rows in the row space are often separable: cap the iterations
    # (predictions settle long before lbfgs's tolerance is met at large C).
    return LogisticRegression(C=C, max_iter=MAX_ITER, warm_start=True)


def _folds(y: np.ndarray, task: str, seed: int, n_splits: int = 3):
    from sklearn.model_selection import KFold, StratifiedKFold

    if (
        task == "classification"
        and np.bincount(np.unique(y, return_inverse=True)[1]).min() >= n_splits
    ):
        return list(StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(y, y))
    return list(KFold(n_splits, shuffle=True, random_state=seed).split(y))


def _score(y_true: np.ndarray, y_pred: np.ndarray, task: str) -> float:
    if task == "classification":
        return float(np.mean(y_true == y_pred))
    resid = np.sum((y_true - y_pred) ** 2)
    return float(1.0 - resid / np.sum((y_true - y_true.mean()) ** 2))


def cv_scores(x: np.ndarray, y: np.ndarray, task: str, seed: int = 0) -> np.ndarray:
    """Mean 3-fold CV score of the probe for each of its settings.

    Parameters
    ----------
    x : ndarray of shape (n, D), already standardised
    y : ndarray of shape (n,)

    Returns
    -------
    ndarray of shape (len(CS),) (classification: accuracy per C) or (1,)
    (regression: R^2 of the GCV ridge).
    """
    folds = _folds(y, task, seed)
    if task == "regression":
        from sklearn.linear_model import RidgeCV

        preds = np.empty_like(y, dtype=float)
        for tr, va in folds:
            preds[va] = RidgeCV(alphas=ALPHAS).fit(x[tr], y[tr]).predict(x[va])
        return np.array([_score(y, preds, task)])
    correct = np.zeros(len(CS))
    for tr, va in folds:
        xtr, xva = _row_space(x[tr], x[va])
        model = _logistic(CS[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for j, C in enumerate(CS):  # ascending: each fit starts from the previous solution
                correct[j] += np.sum(model.set_params(C=C).fit(xtr, y[tr]).predict(xva) == y[va])
    return correct / len(y)


def probe_score(
    xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, seed: int = 0
) -> tuple[float, float]:
    """Test score of the probe trained on train: ``(score, setting)``.

    Classification: accuracy of ``LogisticRegression(C)``, C from :data:`CS` by
    3-fold stratified CV on train (ties: the smaller C). Regression: R^2 of
    ``RidgeCV(alphas=ALPHAS)`` (GCV on train); the setting is the chosen alpha.
    ``xtr``/``xte`` are already standardised (train statistics).
    """
    task = task_of(ytr)
    if task == "regression":
        from sklearn.linear_model import RidgeCV

        model = RidgeCV(alphas=ALPHAS).fit(xtr, ytr)
        return _score(yte, model.predict(xte), task), float(model.alpha_)
    C = CS[int(np.argmax(cv_scores(xtr, ytr, task, seed)))]
    xtr, xte = _row_space(xtr, xte)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _score(yte, _logistic(C).fit(xtr, ytr).predict(xte), task), C


# ----------------------------------------------------------------------------- oracle
def layer_kernels(z: Layers, train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer linear kernels ``Z_l Z_l^T / D_l`` of standardised layers.

    Returns
    -------
    k_train : ndarray of shape (L, n_train, n_train)
    k_test : ndarray of shape (L, n_test, n_train)
    """
    k_tr = np.stack([x[train] @ x[train].T / x.shape[1] for x in z])
    k_te = np.stack([x[test] @ x[train].T / x.shape[1] for x in z])
    return k_tr, k_te


def _targets(ytr: np.ndarray, yte: np.ndarray, task: str):
    if task == "classification":
        classes = np.unique(ytr)
        return (
            (ytr[:, None] == classes).astype(float),
            (yte[:, None] == classes).astype(float),
            classes,
        )
    return ytr[:, None].astype(float), yte[:, None].astype(float), None


def kernel_ridge_score(
    k_tr: np.ndarray, k_te: np.ndarray, ytr: np.ndarray, yte: np.ndarray
) -> tuple[float, float]:
    """Best test score of kernel ridge over :data:`ORACLE_LAMBDAS`.

    Kernel ridge with an unpenalised mean: ``f = K_te (K_tr + lam I)^-1 (Y - mean) + mean``
    on one-hot targets (classification: predicted class = argmax) or the numbers.

    Parameters
    ----------
    k_tr : (n_train, n_train) kernel, k_te : (n_test, n_train)
    ytr, yte : targets (integers: classification)

    Returns
    -------
    (score, -mse) of the best lambda, ranked by score then by -mse (the mean
    squared error of the one-hot / numeric predictions breaks accuracy ties).
    """
    from scipy.linalg import cho_factor, cho_solve

    task = task_of(ytr)
    ytr_m, yte_m, classes = _targets(ytr, yte, task)
    mean = ytr_m.mean(0)
    scale = np.trace(k_tr) / len(k_tr)
    eye = np.eye(len(k_tr))
    best = (-np.inf, -np.inf)
    for lam in ORACLE_LAMBDAS:
        dual = cho_solve(cho_factor(k_tr + lam * scale * eye), ytr_m - mean)
        pred = k_te @ dual + mean
        mse = float(np.mean((pred - yte_m) ** 2))
        if task == "classification":
            score = _score(yte, classes[np.argmax(pred, axis=1)], task)
        else:
            score = _score(yte_m[:, 0], pred[:, 0], task)
        best = max(best, (score, -mse))
    return best


def subset_scores(
    k_tr: np.ndarray, k_te: np.ndarray, ytr: np.ndarray, yte: np.ndarray, subsets
) -> dict[tuple[int, ...], tuple[float, float]]:
    """:func:`kernel_ridge_score` of the summed kernels of each subset."""
    return {
        s: kernel_ridge_score(k_tr[list(s)].sum(0), k_te[list(s)].sum(0), ytr, yte)
        for s in map(tuple, subsets)
    }


def greedy_subset(k_tr, k_te, ytr, yte, k: int) -> tuple[tuple[int, ...], dict]:
    """Forward selection of k layers by :func:`kernel_ridge_score`: ``(subset, scores seen)``."""
    picked: tuple[int, ...] = ()
    seen: dict[tuple[int, ...], tuple[float, float]] = {}
    for _ in range(k):
        cands = [tuple(sorted(picked + (j,))) for j in range(len(k_tr)) if j not in picked]
        step = subset_scores(k_tr, k_te, ytr, yte, cands)
        seen.update(step)
        picked = max(cands, key=lambda s: step[s])  # first best on ties
    return picked, seen


def oracle_ranking(
    k_tr, k_te, ytr, yte, k: int, max_subsets: int = MAX_SUBSETS
) -> tuple[list[tuple[tuple[int, ...], tuple[float, float]]], str]:
    """k-subsets ranked by their kernel-ridge test score, best first.

    Every subset when there are at most ``max_subsets``, else the k-subsets
    scored by greedy forward selection (its last step). Returns
    ``([(subset, (score, -mse)), ...], "exhaustive" | "greedy")``; ties keep
    the lexicographic order of the subsets.
    """
    n_layers = len(k_tr)
    if comb(n_layers, k) <= max_subsets:
        scores, mode = (
            subset_scores(k_tr, k_te, ytr, yte, combinations(range(n_layers), k)),
            "exhaustive",
        )
    else:
        scores, mode = greedy_subset(k_tr, k_te, ytr, yte, k)[1], "greedy"
    ranked = sorted(((s, v) for s, v in scores.items() if len(s) == k), key=lambda sv: sv[0])
    return sorted(ranked, key=lambda sv: sv[1], reverse=True), mode


def oracle_subset(
    k_tr, k_te, ytr, yte, k: int, max_subsets: int = MAX_SUBSETS
) -> tuple[tuple[int, ...], tuple[float, float], str]:
    """The k-subset with the best kernel-ridge test score: ``(subset, (score, -mse), mode)``."""
    ranked, mode = oracle_ranking(k_tr, k_te, ytr, yte, k, max_subsets)
    return ranked[0][0], ranked[0][1], mode


# ----------------------------------------------------------------------------- selectors
def _loes(
    cal_x: Layers, cal_y: np.ndarray, k: int, seed: int, *, preset: str = "robust", fixed_k=None
) -> list[int]:
    from loes import select_layers_from_custom_embeddings

    dims = {x.shape[1] for x in cal_x}
    emb = np.stack(cal_x, axis=1) if len(dims) == 1 else list(cal_x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = select_layers_from_custom_embeddings(
            emb,
            cal_y,
            k=fixed_k if fixed_k is not None else k,
            task=task_of(cal_y),
            preset=preset,
            random_state=seed,
            show_progress=False,
            estimate=False,
        )
    return [int(i) for i in res.selected_layers]


def greedy_probe(cal_x: Layers, cal_y: np.ndarray, k: int, seed: int) -> list[int]:
    """Forward selection of k layers by the probe's 3-fold CV score on calibration
    (best setting per candidate; layers z-scored with calibration statistics)."""
    rows = np.arange(len(cal_y))
    z = zscore(cal_x, rows)
    task = task_of(cal_y)
    picked: list[int] = []
    for _ in range(k):
        cands = [j for j in range(len(z)) if j not in picked]
        scores = [cv_scores(concat(z, picked + [j], rows), cal_y, task, seed).max() for j in cands]
        picked.append(cands[int(np.argmax(scores))])
    return picked


def _random_k(cal_x: Layers, cal_y, k: int, seed: int) -> list[int]:
    return sorted(int(i) for i in np.random.default_rng(seed).choice(len(cal_x), k, replace=False))


#: name -> selector(cal_layers, cal_targets, k, seed) -> layer indices. Add a method here.
SELECTORS: dict[str, Selector] = {
    "last": lambda x, y, k, seed: [len(x) - 1],
    "last_k": lambda x, y, k, seed: list(range(len(x) - k, len(x))),
    "all": lambda x, y, k, seed: list(range(len(x))),
    "random_k": _random_k,
    "greedy_probe": greedy_probe,
    "loes": _loes,
    "loes_k1": partial(_loes, fixed_k=1),
    "loes_k2": partial(_loes, fixed_k=2),
    "loes_k4": partial(_loes, fixed_k=4),
    "loes_ref": partial(_loes, preset="reference"),
    "loes_auto": partial(_loes, fixed_k="auto"),
}
#: Columns computed by the protocol (they see more than the calibration rows).
REFERENCES = ("best_single_cv", "oracle_single", "oracle_k_top1", "oracle_k")


# ----------------------------------------------------------------------------- one split
def run_split(
    layers: Layers,
    y: np.ndarray,
    seed: int,
    k: int,
    methods: Sequence[str] = tuple(SELECTORS),
    max_subsets: int = MAX_SUBSETS,
) -> dict:
    """Every method on one stratified split.

    Returns
    -------
    dict with ``"scores"`` (method -> test score), ``"layers"`` (method -> picks),
    ``"select_s"`` (method -> selection seconds), ``"single"`` (test score of
    each single layer), ``"oracle"`` (kernel-ridge score and search mode) and
    the split sizes.
    """
    y = np.asarray(y)
    cal, train, test = split_indices(y, seed)
    z = zscore(layers, train)
    picks: dict[str, list[int]] = {}
    select_s: dict[str, float] = {}
    cal_x = [np.asarray(x)[cal] for x in layers]
    for name in methods:
        t0 = time.perf_counter()
        picks[name] = sorted(int(i) for i in SELECTORS[name](cal_x, y[cal], k, seed))
        select_s[name] = time.perf_counter() - t0

    memo: dict[tuple[int, ...], float] = {}

    def probe(subset) -> float:
        key = tuple(sorted(subset))
        if key not in memo:
            memo[key] = probe_score(
                concat(z, key, train), y[train], concat(z, key, test), y[test], seed
            )[0]
        return memo[key]

    n_layers = len(layers)
    single = [probe([i]) for i in range(n_layers)]
    t0 = time.perf_counter()
    pool = np.concatenate([cal, train])
    zp = zscore(layers, pool)
    cv_single = [cv_scores(zp[i][pool], y[pool], task_of(y), seed).max() for i in range(n_layers)]
    picks["best_single_cv"] = [int(np.argmax(cv_single))]
    select_s["best_single_cv"] = time.perf_counter() - t0
    picks["oracle_single"] = [int(np.argmax(single))]
    t0 = time.perf_counter()
    k_tr, k_te = layer_kernels(z, train, test)
    ranked, mode = oracle_ranking(k_tr, k_te, y[train], y[test], k, max_subsets)
    picks["oracle_k_top1"] = list(ranked[0][0])
    top = [s for s, _ in ranked[:ORACLE_RESCORE]]
    picks["oracle_k"] = list(top[int(np.argmax([probe(s) for s in top]))])
    select_s["oracle_k"] = time.perf_counter() - t0
    kr = ranked[0][1]
    return {
        "seed": seed,
        "n_cal": len(cal),
        "n_train": len(train),
        "n_test": len(test),
        "scores": {m: probe(p) for m, p in picks.items()},
        "layers": picks,
        "select_s": select_s,
        "single": single,
        "oracle": {"kernel_ridge_score": kr[0], "kernel_ridge_mse": -kr[1], "search": mode},
    }


def add_methods(
    layers: Layers, y: np.ndarray, seed: int, k: int, out: dict, methods: Sequence[str]
) -> dict:
    """Fill in the methods a cached :func:`run_split` output lacks (same split and probe)."""
    missing = [m for m in methods if m not in out["layers"]]
    if not missing:
        return out
    y = np.asarray(y)
    cal, train, test = split_indices(y, seed)
    z = zscore(layers, train)
    cal_x = [np.asarray(x)[cal] for x in layers]
    known = {tuple(p): out["scores"][m] for m, p in out["layers"].items()}
    for name in missing:
        t0 = time.perf_counter()
        picks = sorted(int(i) for i in SELECTORS[name](cal_x, y[cal], k, seed))
        out["select_s"][name] = time.perf_counter() - t0
        out["layers"][name] = picks
        if tuple(picks) not in known:
            known[tuple(picks)] = probe_score(
                concat(z, picks, train), y[train], concat(z, picks, test), y[test], seed
            )[0]
        out["scores"][name] = known[tuple(picks)]
    return out
