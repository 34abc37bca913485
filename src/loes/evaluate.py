"""The evaluation protocol: does a layer selection make a better downstream model?

For each seed the samples are split (stratified for classification) into

* **calibration** — used only to select layers (LOES and every baseline);
* **train** — the probe on the selected layers is fitted here;
* **validation** — the probe's regularisation (or best epoch) is chosen here;
* **test** — reported, never used for any choice.

Every method sees the same splits; the score of LOES and of each baseline is
then compared across seeds with a paired t-test.

Examples
--------
>>> import numpy as np
>>> from loes.evaluate import evaluate
>>> rng = np.random.default_rng(0)
>>> y = rng.integers(0, 3, 400)
>>> X = rng.normal(size=(400, 6, 16))
>>> X[:, 2, :3] += 2 * np.eye(3)[y]
>>> ev = evaluate(X, y, k=2, methods=["loes", "last"], seeds=[0, 1], show_progress=False)
>>> ev.mean_score("loes") > ev.mean_score("last")
True
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loes._deps import require
from loes._exceptions import LOESError, LOESWarning
from loes._json import dumps, float_or_nan, to_jsonable
from loes._progress import ProgressSetting, progress, warnings_at_caller
from loes._validation import check_embeddings, check_k, normalize_task
from loes.baselines import BASELINES, HEADS, MAX_COMBINATIONS, select_baseline
from loes.core import select_layers_from_custom_embeddings
from loes.result import LOESResult, check_fields, format_number, read_json_object
from loes.transfer._fusion import FusionProbe
from loes.transfer._probes import LinearProbe, encode_labels, split_indices

__all__ = [
    "DEFAULT_FRACTIONS",
    "DEFAULT_METHODS",
    "METRIC_LABELS",
    "EvaluationResult",
    "evaluate",
    "paired_ttest",
    "per_layer_scores",
]

logger = logging.getLogger(__name__)

#: Calibration / train / validation / test shares.
DEFAULT_FRACTIONS = (0.25, 0.4, 0.15, 0.2)
#: Methods compared by default: LOES first, then every baseline.
DEFAULT_METHODS = ("loes",) + BASELINES
#: How each test metric is named in tables and plots (higher is better for all
#: current ones; ``"rmse"`` only appears in evaluations saved before R²).
METRIC_LABELS = {"accuracy": "accuracy", "r2": "R²", "rmse": "RMSE"}

Selector = Callable[..., LOESResult]


# ------------------------------------------------------------ paired t-test
def paired_ttest(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired two-sided t-test of ``a`` against ``b`` (same seeds, same order).

    :func:`scipy.stats.ttest_rel` (scipy comes with ``loes[sklearn]``), with
    the degenerate cases decided here.

    Parameters
    ----------
    a, b : sequence of float of equal length n

    Returns
    -------
    dict
        ``mean_diff`` (mean of a − b), ``t``, ``p`` and ``n``. With identical
        differences (zero spread) ``t`` is 0 (all equal) or ±inf and ``p`` is
        1 or 0; with fewer than two pairs ``t`` and ``p`` are NaN.

    Examples
    --------
    >>> r = paired_ttest([0.9, 0.8, 0.85, 0.7], [0.7, 0.75, 0.8, 0.6])
    >>> round(r["t"], 4), round(r["p"], 4)
    (2.8284, 0.0663)
    """
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_arr.shape != b_arr.shape or a_arr.ndim != 1:
        raise LOESError(
            f"paired samples must be 1-D of equal length; got {a_arr.shape} and {b_arr.shape}"
        )
    d = a_arr - b_arr
    n = len(d)
    mean = float(d.mean()) if n else float("nan")
    if n < 2:
        return {"mean_diff": mean, "t": float("nan"), "p": float("nan"), "n": n}
    sd = float(d.std(ddof=1))
    if sd <= 1e-15 * max(1.0, abs(mean)):
        if abs(mean) <= 1e-15:
            return {"mean_diff": mean, "t": 0.0, "p": 1.0, "n": n}
        return {"mean_diff": mean, "t": math.copysign(math.inf, mean), "p": 0.0, "n": n}
    res = _scipy_stats().ttest_rel(a_arr, b_arr)
    return {"mean_diff": mean, "t": float(res.statistic), "p": float(res.pvalue), "n": n}


def _scipy_stats():
    return require("scipy.stats", extra="sklearn", package="scipy")


# ------------------------------------------------------------------ result
@dataclass
class EvaluationResult:
    """Scores of every method on every seed, and their comparison with LOES.

    Attributes
    ----------
    rows : list of dict
        One per (method, seed): ``method``, ``seed``, ``layers``, ``head``,
        ``score`` (test accuracy or R², higher is better), ``val_score``,
        ``selection_time``, ``training_time``.
    metric : {"accuracy", "r2"}
    task, k, probe, seeds, fractions
        The protocol's settings.
    tests : dict
        Per baseline: the paired t-test of LOES against it (``mean_diff`` is
        LOES minus baseline in the metric's units: positive means LOES did better).
    per_layer : dict, optional
        ``{"layer": [...], "mean": [...], "std": [...]}``: test score of a
        probe on each single layer (averaged over seeds).
    selections : dict
        ``{method: LOESResult as dict}`` of the first seed (for reports).
    n_samples : dict
        Sizes of the calibration / train / validation / test splits (first seed).
    layer_names : list of str, optional
    info : dict
        ``majority_accuracy``: test accuracy of always predicting the training
        split's most common class (classification; mean over seeds).
    """

    rows: list[dict[str, Any]]
    metric: str
    task: str
    k: int
    probe: str
    seeds: list[int]
    fractions: list[float]
    tests: dict[str, dict[str, float]] = field(default_factory=dict)
    per_layer: dict[str, list[float]] | None = None
    selections: dict[str, dict[str, Any]] = field(default_factory=dict)
    n_samples: dict[str, int] = field(default_factory=dict)
    layer_names: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        """Methods in the order they were run."""
        seen: list[str] = []
        for r in self.rows:
            if r["method"] not in seen:
                seen.append(r["method"])
        return seen

    def scores(self, method: str) -> list[float]:
        """Test scores of ``method``, one per seed (in seed order)."""
        out = [r["score"] for r in self.rows if r["method"] == method]
        if not out:
            raise KeyError(f"no results for method {method!r}; have {self.methods}")
        return out

    def mean_score(self, method: str) -> float:
        """Mean test score of ``method`` over seeds."""
        return float(np.mean(self.scores(method)))

    def selection(self, method: str = "loes") -> LOESResult:
        """The first seed's selection of ``method`` as a :class:`LOESResult`."""
        return LOESResult.from_dict(self.selections[method])

    def table(self) -> list[dict[str, Any]]:
        """One aggregated row per method: mean/std of the score and the times,
        the layers (of every seed when they differ) and the test against LOES."""
        out = []
        for m in self.methods:
            rows = [r for r in self.rows if r["method"] == m]
            layer_sets = []
            for r in rows:
                if r["layers"] not in layer_sets:
                    layer_sets.append(r["layers"])
            scores = np.array([r["score"] for r in rows], dtype=float)
            row = {
                "method": m,
                "layers": layer_sets[0] if len(layer_sets) == 1 else layer_sets,
                "head": rows[0]["head"],
                self.metric: float(scores.mean()),
                "std": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
                "selection_time": float(np.mean([r["selection_time"] for r in rows])),
                "training_time": float(np.mean([r["training_time"] for r in rows])),
            }
            test = self.tests.get(m)
            row["loes_minus_method"] = test["mean_diff"] if test else None
            row["p_value"] = test["p"] if test else None
            out.append(row)
        return out

    def format_table(self) -> str:
        """The aggregated table as fixed-width text (what ``loes demo`` prints)."""
        name = "acc" if self.metric == "accuracy" else METRIC_LABELS.get(self.metric, self.metric)
        lines = [
            f"{'method':<14} {'layers':<22} {name:>7} {'± std':>7} {'select s':>9} {'train s':>8} "
            f"{'LOES−it':>8} {'p':>7}"
        ]
        for row in self.table():
            layers = row["layers"]
            if layers and isinstance(layers[0], list):
                text = "varies: " + ";".join(",".join(map(str, ls)) for ls in layers)
            elif len(layers) > 6 and layers == list(range(layers[0], layers[-1] + 1)):
                text = f"{layers[0]}..{layers[-1]} ({len(layers)})"
            else:
                text = ",".join(map(str, layers))
            if len(text) > 22:
                text = text[:21] + "…"
            diff = (
                ""
                if row["loes_minus_method"] is None
                else format_number(row["loes_minus_method"], "+.3f")
            )
            p = "" if row["p_value"] is None else format_number(row["p_value"], ".3f")
            lines.append(
                f"{row['method']:<14} {text:<22} {format_number(row[self.metric]):>7} "
                f"{format_number(row['std']):>7} "
                f"{row['selection_time']:>9.3f} {row['training_time']:>8.3f} {diff:>8} {p:>7}"
            )
        if "majority_accuracy" in self.info:
            lines.append(
                f"(majority class: {self.info['majority_accuracy']:.4f}; "
                f"LOES−it and p: paired t-test over {len(self.seeds)} seeds)"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format_table()

    def to_frame(self):
        """The per-seed rows as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows)

    def to_dict(self) -> dict[str, Any]:
        """A strict-JSON dict (:mod:`loes._json`: NaN as None); inverse: :meth:`from_dict`."""
        return to_jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvaluationResult:
        """Inverse of :meth:`to_dict`: the numbers written as None are NaN again."""
        d = check_fields(cls, d, "evaluation result")
        d["rows"] = [{**r, **{k: float_or_nan(r.get(k)) for k in _ROW_NUMBERS}} for r in d["rows"]]
        d["tests"] = {
            m: {k: (v if k == "n" else float_or_nan(v)) for k, v in t.items()}
            for m, t in (d.get("tests") or {}).items()
        }
        if d.get("per_layer"):
            d["per_layer"] = {
                k: (v if k == "layer" else [float_or_nan(x) for x in v])
                for k, v in d["per_layer"].items()
            }
        return cls(**d)

    def to_json(self, path: str | None = None) -> str:
        """Serialise to strict JSON (NaN as ``null``); also write to ``path`` when given."""
        text = dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> EvaluationResult:
        """Inverse of :meth:`to_json`: a JSON string or a path to a JSON file."""
        return cls.from_dict(read_json_object(text_or_path, "evaluation result"))


#: The numbers of an evaluation row (None in JSON for a missing value).
_ROW_NUMBERS = ("score", "val_score", "selection_time", "training_time")


# ---------------------------------------------------------------- training
def _make_probe(
    head: str,
    layers: list[int],
    probe: str,
    task: str,
    seed: int,
    fusion_options: dict[str, Any] | None,
):
    opts = dict(fusion_options or {})
    if head == "layer_weights":
        opts.setdefault("lr", 1e-2)
        opts.setdefault("epochs", 40)
        opts.update(hidden=None, fusion="weighted")
        return FusionProbe(layers, task=task, random_state=seed, **opts)
    if probe == "fusion":
        return FusionProbe(layers, task=task, random_state=seed, **opts)
    return LinearProbe(layers, kind=probe, task=task, random_state=seed)


def per_layer_scores(
    embeddings: Any,
    targets: Any,
    splits: Sequence[np.ndarray],
    *,
    task: str = "classification",
    probe: str = "ridge",
    random_state: int = 0,
) -> list[float]:
    """Test score of a probe on each single layer (train / validation / test splits).

    Parameters
    ----------
    embeddings : array of shape (n_samples, n_layers, dim) or list of layers
    targets : array of shape (n_samples,)
    splits : (train, validation, test) index arrays
    """
    layers = check_embeddings(embeddings)
    tr, va, te = splits
    y = np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets)
    kind = "ridge" if probe == "fusion" else probe
    out = []
    for x in layers:
        x = x.detach().cpu()
        p = LinearProbe([0], kind=kind, task=task, random_state=random_state)
        p.fit([x[tr]], y[tr], [x[va]], y[va])
        out.append(p.score([x[te]], y[te]))
    return out


def _run_selector(
    method: str | Selector,
    name: str,
    cal: list[torch.Tensor],
    y_cal: np.ndarray,
    k: int,
    task: str,
    seed: int,
    loes_options: dict[str, Any],
    baseline_options: dict[str, Any],
) -> LOESResult:
    if callable(method):
        return method(cal, y_cal, k, task=task, random_state=seed)
    if method == "loes":
        opts = dict(loes_options)
        opts.setdefault("show_progress", False)
        return select_layers_from_custom_embeddings(
            cal, y_cal, k, task=task, random_state=seed, **opts
        )
    return select_baseline(method, cal, y_cal, k, task=task, random_state=seed, **baseline_options)


@warnings_at_caller
def evaluate(
    embeddings: Any,
    targets: Any,
    *,
    k: int = 3,
    task: str = "classification",
    methods: Sequence[str | tuple] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    probe: str = "ridge",
    loes_options: dict[str, Any] | None = None,
    baseline_options: dict[str, Any] | None = None,
    fusion_options: dict[str, Any] | None = None,
    per_layer: bool = True,
    layer_names: Sequence[str] | None = None,
    show_progress: ProgressSetting = "auto",
) -> EvaluationResult:
    """Compare LOES with baselines under the calibration / train / validation / test protocol.

    Parameters
    ----------
    embeddings : array of shape (n_samples, n_layers, dim) or list of (n_samples, dim_l)
        Embeddings of all samples (every split is drawn from them).
    targets : array of shape (n_samples,) labels, or (n_samples,) numbers for regression
    k : int
        Layer budget of LOES and of the k-layer baselines.
    task : {"classification", "regression"}
    methods : sequence, optional
        Method names (``"loes"`` and :data:`loes.baselines.BASELINES`) or
        ``(name, selector)`` pairs with ``selector(embeddings, targets, k, task=,
        random_state=) -> LOESResult``. Default: :data:`DEFAULT_METHODS`;
        ``exhaustive`` is dropped (with a warning) when it would enumerate more
        than ``max_combinations`` subsets.
    seeds : sequence of int
        One split (and one seed for every random choice) per entry.
    fractions : 4 floats
        Calibration / train / validation / test shares.
    probe : {"ridge", "logistic", "fusion"}
        What is trained on the selected layers: a linear probe, or the fusion
        head (:class:`~loes.transfer.FusionProbe`; ``fusion_options`` go to it).
        The ``layer_weights`` baseline always trains its softmax-weighted head.
    loes_options : dict, optional
        Keyword arguments for :func:`loes.select_layers_from_custom_embeddings`
        (e.g. ``{"preset": "reference"}``).
    baseline_options : dict, optional
        Keyword arguments for :func:`loes.baselines.select_baseline`.
    per_layer : bool
        Also report the test score of a probe on each single layer.
    layer_names : sequence of str, optional
    show_progress : bool or str

    Returns
    -------
    EvaluationResult
    """
    task = normalize_task(task)
    if task == "label_free":
        raise LOESError("evaluation needs targets: task must be 'classification' or 'regression'")
    if probe not in ("ridge", "logistic", "fusion"):
        raise LOESError(f"probe must be 'ridge', 'logistic' or 'fusion'; got {probe!r}")
    if len(fractions) != 4:
        raise LOESError(
            f"fractions must give 4 shares (calibration, train, validation, test); got {fractions}"
        )
    if not seeds:
        raise LOESError("seeds is empty: pass at least one seed")
    layers = [x.detach().cpu() for x in check_embeddings(embeddings)]
    n_layers, n = len(layers), layers[0].shape[0]
    k = check_k(k, n_layers)
    y = np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets)
    if y.shape[0] != n:
        raise LOESError(f"targets must have one entry per sample ({n}); got {y.shape[0]}")
    if task == "classification":
        y_ids, _ = encode_labels(y.reshape(-1) if y.ndim == 1 else y.argmax(1))
        strat = y_ids.numpy()
    else:
        strat = None
    loes_options = dict(loes_options or {})
    baseline_options = dict(baseline_options or {})

    chosen: list[tuple] = []
    for m in methods if methods is not None else DEFAULT_METHODS:
        name, fn = (m, m) if isinstance(m, str) else (m[0], m[1])
        if isinstance(fn, str) and fn != "loes" and fn not in BASELINES:
            raise LOESError(f"unknown method {fn!r}; choose 'loes' or one of {list(BASELINES)}")
        if fn == "exhaustive":
            limit = baseline_options.get("max_combinations", MAX_COMBINATIONS)
            if math.comb(n_layers, k) > limit:
                if methods is not None:
                    raise LOESError(
                        f"exhaustive search over C({n_layers}, {k}) = {math.comb(n_layers, k)} subsets "
                        f"exceeds max_combinations={limit}; raise it in baseline_options or drop 'exhaustive'"
                    )
                warnings.warn(
                    f"skipping 'exhaustive': C({n_layers}, {k}) = {math.comb(n_layers, k)} "
                    f"subsets exceed max_combinations={limit}",
                    LOESWarning,
                    stacklevel=2,
                )
                continue
        chosen.append((name, fn))
    names = [c[0] for c in chosen]
    if len(set(names)) != len(names):
        raise LOESError(f"method names must be unique; got {names}")
    if "loes" in names and len(names) > 1:
        _scipy_stats()  # the comparison needs scipy: fail before any work, not after

    metric = "accuracy" if task == "classification" else "r2"
    rows: list[dict[str, Any]] = []
    selections: dict[str, dict[str, Any]] = {}
    per_layer_runs: list[list[float]] = []
    majority_runs: list[float] = []
    sizes: dict[str, int] = {}
    jobs = [(s, c) for s in seeds for c in chosen]
    bar = progress(jobs, show_progress, desc="evaluate", total=len(jobs), unit="run")

    def _run_jobs() -> None:
        current_seed = None
        for seed, (name, fn) in bar:
            if seed != current_seed:
                current_seed = seed
                cal, tr, va, te = split_indices(n, fractions, seed, strat)
                if min(len(cal), len(tr), len(va), len(te)) < 3:
                    raise LOESError(
                        f"too few samples ({n}) for the four splits {list(fractions)}: got sizes "
                        f"{[len(cal), len(tr), len(va), len(te)]}; pass more samples"
                    )
                if not sizes:
                    sizes.update(
                        calibration=len(cal), train=len(tr), validation=len(va), test=len(te)
                    )
                if task == "classification":
                    values, counts = np.unique(y[tr], return_counts=True)
                    majority_runs.append(float(np.mean(y[te] == values[np.argmax(counts)])))
                if per_layer:
                    per_layer_runs.append(
                        per_layer_scores(
                            layers, y, (tr, va, te), task=task, probe=probe, random_state=seed
                        )
                    )
            t0 = time.perf_counter()
            res = _run_selector(
                fn,
                name,
                [x[cal] for x in layers],
                y[cal],
                k,
                task,
                seed,
                loes_options,
                baseline_options,
            )
            t_sel = time.perf_counter() - t0
            head = (
                res.config.get("head", HEADS.get(name, "concat"))
                if isinstance(res.config, dict)
                else "concat"
            )
            chosen_layers = list(res.selected_layers)
            t0 = time.perf_counter()
            model = _make_probe(head, chosen_layers, probe, task, seed, fusion_options)
            model.fit(
                [layers[i][tr] for i in range(n_layers)],
                y[tr],
                [layers[i][va] for i in range(n_layers)],
                y[va],
            )
            score = model.score([layers[i][te] for i in range(n_layers)], y[te])
            t_train = time.perf_counter() - t0
            rows.append(
                {
                    "method": name,
                    "seed": int(seed),
                    "layers": [int(i) for i in chosen_layers],
                    "head": head,
                    "score": float(score),
                    "val_score": float(getattr(model, "best_val_score_", float("nan"))),
                    "selection_time": t_sel,
                    "training_time": t_train,
                }
            )
            if seed == seeds[0]:
                selections[name] = res.to_dict()
            logger.info(
                "seed %d %-14s layers %s %s %.4f (select %.2fs, train %.2fs)",
                seed,
                name,
                chosen_layers,
                metric,
                score,
                t_sel,
                t_train,
            )

    # the same warning (e.g. N <= D on every calibration split) is shown once, not once per run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run_jobs()
    seen_messages = set()
    for w in caught:
        key = (str(w.message), w.category)
        if key not in seen_messages:
            seen_messages.add(key)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    result = EvaluationResult(
        rows=rows,
        metric=metric,
        task=task,
        k=k,
        probe=probe,
        seeds=[int(s) for s in seeds],
        fractions=[float(f) for f in fractions],
        selections=selections,
        n_samples=sizes,
        layer_names=list(layer_names) if layer_names is not None else None,
    )
    if "loes" in names:
        base = result.scores("loes")
        for other in names:
            if other != "loes":
                result.tests[other] = paired_ttest(base, result.scores(other))
    if majority_runs:
        result.info["majority_accuracy"] = float(np.mean(majority_runs))
    if per_layer_runs:
        arr = np.asarray(per_layer_runs)
        result.per_layer = {
            "layer": list(range(n_layers)),
            "mean": arr.mean(0).tolist(),
            "std": (arr.std(0, ddof=1) if len(arr) > 1 else np.zeros(n_layers)).tolist(),
        }
    return result
