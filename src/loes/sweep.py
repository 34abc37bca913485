"""Layer sweep: one linear probe per layer from one extraction, scored by cross-validation.

The probe is closed-form ridge on each layer's centred features (one-hot
targets and arg-max prediction for classification). Within each training fold
the ridge strength is chosen by generalised cross-validation from one SVD, so
the held-out fold is never used to tune anything; the score is accuracy
(classification) or R² (regression), averaged over folds.

:meth:`LayerSweep.fit_stream` (:func:`sweep_layers_streaming`) fits the same
probes from a stream of batches far larger than memory: ridge weights and GCV
are functions of the float64 moments of :mod:`loes.stats` (mean, XcᵀXc, XcᵀYc,
Σ(y − ȳ)²), accumulated batch by batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from loes._deps import require
from loes._exceptions import LOESError
from loes._linalg import RidgePath
from loes._naming import layer_label
from loes._progress import ProgressSetting, progress
from loes._splits import kfold
from loes._validation import check_embeddings, check_targets, normalize_task
from loes.layers import infer_task, resolve_layers
from loes.stats import LayerMoments, MomentRidge, Moments, as_rows, split_layers, split_xy

__all__ = [
    "LayerSweep",
    "ridge_gcv_fit",
    "ridge_gcv_fit_moments",
    "sweep_layers",
    "sweep_layers_streaming",
]

logger = logging.getLogger(__name__)

#: Ridge strengths tried, relative to the mean non-zero eigenvalue of XᵀX.
DEFAULT_ALPHAS = tuple(np.logspace(-4, 2, 13))


def ridge_gcv_fit(x: np.ndarray, y: np.ndarray, alphas: Sequence[float] = DEFAULT_ALPHAS):
    """Ridge with intercept, strength chosen by generalised cross-validation.

    Parameters
    ----------
    x : ndarray of shape (n, d)
    y : ndarray of shape (n, m)
    alphas : relative strengths (:func:`loes._linalg.relative_penalty`: the
        penalty is ``alpha · tr(XcᵀXc) / min(n − 1, d)``).

    Returns
    -------
    (w, b, lam) : (d, m) weights, (m,) intercept and the absolute penalty chosen.
        The first alpha with the smallest ``GCV = ‖Yc − Ŷ‖² / (1 − tr H / n)²``,
        ``tr H = 1 + Σ s²/(s² + λ)`` counting the intercept
        (:class:`loes._linalg.RidgePath`, one SVD). A constant layer predicts
        the mean (``lam = inf``).
    """
    return _fit_rows(x, y, alphas)[:3]


def ridge_gcv_fit_moments(moments: Moments, alphas: Sequence[float] = DEFAULT_ALPHAS):
    """:func:`ridge_gcv_fit` from streamed moments instead of the rows.

    Parameters
    ----------
    moments : loes.stats.Moments
        With targets (one-hot columns for classification), at least 2 rows.
    alphas : relative strengths, as for :func:`ridge_gcv_fit`.

    Returns
    -------
    (w, b, lam) : the same as :func:`ridge_gcv_fit` on the rows behind the
        moments, up to rounding (:class:`loes.stats.MomentRidge`).
    """
    return _fit_moments(moments, alphas)[:3]


def _fit_rows(x, y, alphas):
    """``(w, b, lam, alpha)``: the GCV ridge on rows and the relative strength chosen."""
    path = RidgePath(x, y)
    if path.trace <= 0:  # constant layer: predict the mean
        inf = float("inf")
        return np.zeros((x.shape[1], path.yc.shape[1])), path.y_mean[0].numpy(), inf, inf
    best = _argmin([float((path.gcv_residuals(a) ** 2).sum()) for a in alphas], alphas)
    w, b = path.coef(best)
    return w.numpy(), b.numpy(), path.penalty(best), best


def _fit_moments(moments: Moments, alphas):
    """``(w, b, lam, alpha)`` from moments (:class:`loes.stats.MomentRidge`)."""
    if float(np.trace(moments.m2)) <= 0:  # constant layer: predict the mean
        inf = float("inf")
        return np.zeros((moments.dim, moments.n_targets)), moments.y_mean, inf, inf
    ridge = MomentRidge(moments)
    best = _argmin([ridge.gcv(a) for a in alphas], alphas)
    w, b = ridge.coef(best)
    return w, b, ridge.penalty(best), best


def _argmin(scores: Sequence[float], alphas: Sequence[float]) -> float:
    """The first alpha with the smallest score (NaN counts as +inf)."""
    return alphas[int(np.argmin(np.nan_to_num(scores, nan=np.inf)))]


class LayerSweep:
    """Score every layer with its own cross-validated linear probe.

    Parameters
    ----------
    task : {"classification", "regression"}, optional
        Inferred from the targets when None (integer/string labels:
        classification).
    cv : int
        Folds (stratified for classification, seeded by ``random_state``).
    layers : layer spec, optional
        Which layers to sweep (see :func:`loes.layers.resolve_layers`);
        default all.
    alphas : sequence of float
        Relative ridge strengths searched by GCV inside each training fold.
    random_state : int
    show_progress : bool or {"auto", "on", "off"}

    Attributes
    ----------
    layers_ : list of int
    scores_ : ndarray of shape (n_swept,)
        Mean held-out accuracy or R² per swept layer.
    fold_scores_ : ndarray of shape (n_swept, cv), or (n_swept, 1) when scored on held-out batches
    fold_alphas_ : ndarray of shape (n_swept, cv) or (n_swept, 1)
        The relative ridge strength GCV chose in each training fold (inf for
        a constant layer, which predicts the mean).
    baseline_ : float
        Majority-class accuracy (classification) or 0 (R² of the mean).
    coefs_ : list of (w, b)
        Each layer's probe refitted on all samples.
    layer_names_ : list of str or None
        The model's name of every layer (all, not only the swept ones), when known.
    validation_ : {"cv", "shard_cv", "holdout"}
        How the scores were made: ``cv`` folds of samples (:meth:`fit`), of
        batches or held-out batches (:meth:`fit_stream`).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 3, 300)
    >>> X = rng.normal(size=(300, 5, 8)); X[:, 3, :3] += 2 * np.eye(3)[y]
    >>> LayerSweep(cv=5).fit(X, y).best_layer()
    3
    """

    def __init__(
        self,
        task: str | None = None,
        *,
        cv: int = 5,
        layers: Any = "all",
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        random_state: int = 0,
        show_progress: ProgressSetting = "auto",
    ):
        self.task = task
        self.cv = cv
        self.layers = layers
        self.alphas = alphas
        self.random_state = random_state
        self.show_progress = show_progress

    def fit(
        self, embeddings: Any, targets: Any, layer_names: Sequence[str] | None = None
    ) -> LayerSweep:
        """Cross-validate one probe per layer, then refit each on all samples.

        Parameters
        ----------
        embeddings : array of shape (n_samples, n_layers, dim) or list of layers
        targets : array of shape (n_samples,) or (n_samples, m)
        layer_names : sequence of str, optional
            The model's name of each layer (``LOESResult.layer_names``), for
            tables and plots; taken from ``embeddings.layer_names`` when it has them.
        """
        names = layer_names if layer_names is not None else getattr(embeddings, "layer_names", None)
        all_layers = check_embeddings(embeddings)
        if names is not None and len(names) != len(all_layers):
            raise LOESError(f"layer_names has {len(names)} names for {len(all_layers)} layers")
        self.layer_names_ = list(names) if names is not None else None
        n = all_layers[0].shape[0]
        task = normalize_task(self.task) if self.task is not None else infer_task(targets)
        if task == "label_free":
            raise LOESError(
                "a layer sweep needs targets: task must be 'classification' or 'regression'"
            )
        tgt = check_targets(targets, task, n)
        if tgt.keep is not None:
            all_layers = [layer[tgt.keep] for layer in all_layers]
            n = all_layers[0].shape[0]
        y = tgt.y.numpy()
        labels = tgt.labels.numpy() if tgt.labels is not None else None
        self._check_cv(n)
        self.task_ = task
        self.layers_ = resolve_layers(self.layers, len(all_layers))
        folds = kfold(n, int(self.cv), self.random_state, labels)
        truth = labels if task == "classification" and labels is not None else y.argmax(1)
        if task == "classification":
            self.baseline_ = float(np.bincount(truth).max() / n)
        else:
            self.baseline_ = 0.0
        self.fold_scores_ = np.zeros((len(self.layers_), len(folds)))
        self.fold_alphas_ = np.zeros((len(self.layers_), len(folds)))
        self.coefs_ = []
        for row, layer in enumerate(
            progress(self.layers_, self.show_progress, desc="layer sweep", unit="layer")
        ):
            x = all_layers[layer].detach().cpu().double().numpy()
            for f, (train, held) in enumerate(folds):
                w, b, _, self.fold_alphas_[row, f] = _fit_rows(x[train], y[train], self.alphas)
                pred = x[held] @ w + b
                self.fold_scores_[row, f] = _score(pred, y[held], truth[held], task)
            self.coefs_.append(ridge_gcv_fit(x, y, self.alphas)[:2])
        self.scores_ = self.fold_scores_.mean(1)
        self.classes_ = tgt.classes
        self.validation_ = "cv"
        logger.info("layer sweep: best layer %d (%.4f)", self.best_layer(), self.scores_.max())
        return self

    def fit_stream(
        self,
        batches: Any,
        test_batches: Any = None,
        *,
        classes: Sequence[Any] | None = None,
        layer_names: Sequence[str] | None = None,
    ) -> LayerSweep:
        """Fit the same probes from a stream of ``(x, y)`` batches, with bounded memory.

        What is streamed: per swept layer, the float64 moments of
        :class:`loes.stats.LayerMoments` (mean, ``XcᵀXc``, ``XcᵀYc``, the
        targets' mean and ``Σ(y − ȳ)²``), one set per fold. Ridge weights and
        the GCV choice of the strength in each training fold are exact
        functions of those moments (:class:`loes.stats.MomentRidge`): the same
        ``alpha`` and weights as :meth:`fit` on the same training rows.
        Memory is ``(cv + 1) · Σ_l D_l²`` float64 over the swept layers,
        whatever the number of rows.

        How it is scored:

        - without ``test_batches``: ``cv`` folds of *batches* (batch ``i``
          is held out in fold ``i mod cv``; ``random_state`` is not used, so
          shuffle rows across batches first if the stream is ordered, e.g.
          by label). R² comes from the held-out fold's moments; accuracy
          needs each row's prediction, so classification reads ``batches``
          a second time;
        - with ``test_batches``: one probe per layer fitted on all of
          ``batches`` (GCV on the training moments), scored once on
          ``test_batches`` (the held-out data tunes nothing). The baseline
          is the test set's majority-class frequency.

        Parameters
        ----------
        batches : iterable of (x, y), or a function returning a fresh one
            ``x``: array or tensor of shape (n, n_layers, dim) or a list of
            n_layers arrays (n, dim_l); ``y``: class labels (n,) or values
            (n,) / (n, t). A second pass (classification without
            ``test_batches``) needs the same batches in the same order: pass
            a list, a re-iterable object or a function returning a fresh
            iterator (a generator can be read only once).
        test_batches : iterable of (x, y), or a function returning one, optional
        classes : sequence of labels, optional
            The fixed class list (classification): a stream cannot be scanned
            for its labels up front, so it must be given; a label outside it
            is an error. ``task`` defaults to "classification" with
            ``classes``; a regression sweep needs ``task="regression"``.
        layer_names : sequence of str, optional

        Examples
        --------
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> def batches():  # a fresh pass each call, e.g. over files on disk
        ...     r = np.random.default_rng(1)
        ...     for _ in range(8):
        ...         y = r.integers(0, 3, 50)
        ...         x = r.normal(size=(50, 4, 6)); x[:, 2, :3] += 2 * np.eye(3)[y]
        ...         yield x, y
        >>> sweep = LayerSweep(cv=4, show_progress=False).fit_stream(batches, classes=[0, 1, 2])
        >>> sweep.best_layer(), sweep.validation_
        (2, 'shard_cv')
        """
        task = self._stream_task(classes)
        holdout = test_batches is not None
        k = 1 if holdout else self._check_cv(None)
        if task == "classification" and not holdout and not _reiterable(batches):
            raise LOESError(
                "a classification sweep without test_batches reads the batches twice (accuracy "
                "needs each row's prediction), but they are a one-shot iterator: pass a list, "
                "a re-iterable object, or a function returning a fresh iterator"
            )
        parts, n_batches = self._stream_moments(batches, task, classes, k, "batches")
        if not holdout and n_batches < k:
            raise LOESError(
                f"cv={k} folds of batches need at least {k} batches; got {n_batches}: pass more, "
                "smaller batches, fewer folds, or test_batches"
            )
        names = layer_names
        if names is not None and len(names) != self._n_layers:
            raise LOESError(f"layer_names has {len(names)} names for {self._n_layers} layers")
        self.layer_names_ = list(names) if names is not None else None
        self.task_, self.classes_ = task, parts[0].classes
        self.validation_ = "holdout" if holdout else "shard_cv"
        n_rows = len(self.layers_)
        self.fold_scores_ = np.zeros((n_rows, k))
        self.fold_alphas_ = np.zeros((n_rows, k))
        self.coefs_ = []
        fits = []  # (w, b) per layer and fold, for the classification pass
        for row in progress(
            range(n_rows), self.show_progress, desc="layer sweep (moments)", unit="layer"
        ):
            per_fold = [part[row] for part in parts]
            total = per_fold[0] if holdout else _merged(per_fold)
            fits.append([])
            for f in range(k):
                train = total if holdout else _merged(per_fold[:f] + per_fold[f + 1 :])
                w, b, _, self.fold_alphas_[row, f] = _fit_moments(train, self.alphas)
                fits[row].append((w, b))
                if task == "regression" and not holdout:
                    held = per_fold[f]
                    sst = float(held.y_ss.sum())
                    self.fold_scores_[row, f] = 1.0 - held.residual_ss(w, b) / sst if sst else 0.0
            self.coefs_.append(fits[row][0] if holdout else _fit_moments(total, self.alphas)[:2])
        if task == "regression":
            self.baseline_ = 0.0
            if holdout:
                self._score_regression_holdout(test_batches, fits)
        else:
            scored = test_batches if holdout else batches
            self._score_classification(scored, classes, fits, k, None if holdout else n_batches)
        self.scores_ = self.fold_scores_.mean(1)
        logger.info("layer sweep: best layer %d (%.4f)", self.best_layer(), self.scores_.max())
        return self

    def _stream_task(self, classes: Any) -> str:
        if self.task is None:
            if classes is None:
                raise LOESError(
                    "a streaming sweep cannot infer the task from a stream: pass classes=[...] "
                    "(classification) or task='regression'"
                )
            return "classification"
        task = normalize_task(self.task)
        if task == "label_free":
            raise LOESError(
                "a layer sweep needs targets: task must be 'classification' or 'regression'"
            )
        if task == "classification" and classes is None:
            raise LOESError(
                "a streaming classification sweep needs the class list up front: classes=[...]"
            )
        if task == "regression" and classes is not None:
            raise LOESError("classes are for classification; a regression sweep takes none")
        return task

    def _check_cv(self, n: int | None) -> int:
        """``cv`` as an int in [2, n] (any n >= 2 when n is None)."""
        bad = isinstance(self.cv, bool) or not isinstance(self.cv, (int, np.integer))
        if bad or self.cv < 2 or (n is not None and self.cv > n):
            upper = f"n_samples ({n})" if n is not None else "the number of batches"
            raise LOESError(f"cv must be an integer between 2 and {upper}; got {self.cv!r}")
        return int(self.cv)

    def _stream_moments(
        self, source: Any, task: str, classes: Any, k: int, what: str
    ) -> tuple[list[LayerMoments], int]:
        """One pass: batch ``i`` into part ``i mod k``; resolves ``layers_`` at the first batch."""
        parts: list[LayerMoments] = []
        count = 0
        items = progress(_open(source), self.show_progress, desc=f"moments ({what})", unit="batch")
        for i, item in enumerate(items):
            x, y = split_xy(item)
            if y is None:
                raise LOESError(f"{what} item {i} has no targets: yield (x, y) pairs")
            if not parts:
                self._n_layers = len(split_layers(x))
                self.layers_ = resolve_layers(self.layers, self._n_layers)
                parts = [
                    LayerMoments(task=task, classes=classes, layers=self.layers_) for _ in range(k)
                ]
            self._check_n_layers(x, what, i)
            parts[i % k].update(x, y)
            count += 1
        if not parts:
            raise LOESError(f"{what} yielded no batches")
        return parts, count

    def _check_n_layers(self, x: Any, what: str, i: int) -> list[Any]:
        layers = split_layers(x)
        if len(layers) != self._n_layers:
            raise LOESError(
                f"{what} item {i} has {len(layers)} layers; the first batch had {self._n_layers}"
            )
        return layers

    def _score_regression_holdout(self, source: Any, fits: list) -> None:
        """R² of each layer's probe on the held-out batches, from their moments."""
        held = LayerMoments(task="regression", layers=self.layers_)
        for i, item in enumerate(_open(source)):
            x, y = split_xy(item)
            self._check_n_layers(x, "test_batches", i)
            held.update(x, y)
        if held.n == 0:
            raise LOESError("test_batches yielded no batches")
        for row, m in enumerate(held):
            w, b = fits[row][0]
            sst = float(m.y_ss.sum())
            self.fold_scores_[row, 0] = 1.0 - m.residual_ss(w, b) / sst if sst else 0.0

    def _score_classification(
        self, source: Any, classes: Any, fits: list, k: int, expect: int | None
    ) -> None:
        """Accuracy per layer and fold from one pass of predictions; sets ``baseline_``."""
        correct = np.zeros((len(self.layers_), k))
        counts = np.zeros(k)
        class_counts = np.zeros(len(classes))
        encoder = Moments(classes=classes)
        i = -1
        for i, item in enumerate(_open(source)):
            f = i % k
            x, y = split_xy(item)
            layers = self._check_n_layers(x, "scored batches", i)
            rows = [
                as_rows(layers[l], f"layer {l}", fits[row][0][0].shape[0])
                for row, l in enumerate(self.layers_)
            ]
            truth = encoder.encode_targets(y, rows[0].shape[0]).argmax(1).numpy()
            for row, t in enumerate(rows):
                w, b = fits[row][f]
                pred = t.detach().cpu().double().numpy() @ w + b
                correct[row, f] += float((pred.argmax(1) == truth).sum())
            counts[f] += len(truth)
            class_counts += np.bincount(truth, minlength=len(classes))
        if expect is not None and i + 1 != expect:
            raise LOESError(
                f"the second pass over the batches gave {i + 1} batches, the first {expect}: "
                "the batches must be the same, in the same order, on every pass"
            )
        if i < 0:
            raise LOESError("test_batches yielded no batches")
        self.fold_scores_[:] = correct / counts
        self.baseline_ = float(class_counts.max() / counts.sum())

    def best_layer(self) -> int:
        """The swept layer with the highest mean cross-validated score (ties: the earliest)."""
        self._check_fitted()
        return int(self.layers_[int(np.argmax(self.scores_))])

    def importances(self) -> dict[int, float]:
        """Each layer's share of the above-baseline score: ``max(score − baseline, 0)``
        normalised to sum to 1 (all zeros when no layer beats the baseline)."""
        self._check_fitted()
        gain = np.clip(self.scores_ - self.baseline_, 0, None)
        total = gain.sum()
        share = gain / total if total > 0 else gain
        return {int(l): float(v) for l, v in zip(self.layers_, share)}

    def predict(self, embeddings: Any, layer: int | None = None) -> np.ndarray:
        """Predict with one layer's refitted probe (default: the best layer).

        Returns class labels (classification) or values of shape (n, m) / (n,).
        """
        self._check_fitted()
        layer = self.best_layer() if layer is None else int(layer)
        if layer not in self.layers_:
            raise LOESError(f"layer {layer} was not swept; swept layers: {self.layers_}")
        w, b = self.coefs_[self.layers_.index(layer)]
        x = check_embeddings(embeddings)[layer].detach().cpu().double().numpy()
        out = x @ w + b
        if self.task_ == "classification":
            return np.asarray(self.classes_)[out.argmax(1)]
        return out[:, 0] if out.shape[1] == 1 else out

    def table(self) -> str:
        """Plain-text table: layer, mean score, fold std, importance."""
        self._check_fitted()
        name = "accuracy" if self.task_ == "classification" else "R2"
        imp = self.importances()
        labels = [layer_label(layer, self.layer_names_) for layer in self.layers_]
        width = max(5, *map(len, labels))
        lines = [f"{'layer':<{width}}  {name:>9}  {'std':>7}  {'importance':>10}"]
        best = self.best_layer()
        for label, layer, s, sd in zip(
            labels, self.layers_, self.scores_, self.fold_scores_.std(1)
        ):
            mark = "  *" if layer == best else ""
            lines.append(f"{label:<{width}}  {s:>9.4f}  {sd:>7.4f}  {imp[layer]:>10.4f}{mark}")
        lines.append(
            f"baseline ({'majority class' if self.task_ == 'classification' else 'mean'}): "
            f"{self.baseline_:.4f}"
        )
        return "\n".join(lines)

    def to_frame(self):
        """One row per swept layer: a pandas DataFrame indexed by layer.

        Columns: ``name`` (the model's name, when known), ``score`` (mean
        cross-validated accuracy or R²), ``std`` (over folds), ``importance``
        (:meth:`importances`); ``frame.attrs`` holds ``metric``, ``baseline``
        and ``cv``.
        """
        self._check_fitted()
        try:
            import pandas as pd
        except ImportError as e:  # pragma: no cover - pandas comes with datasets
            raise ImportError("LayerSweep.to_frame requires pandas: pip install pandas") from e
        frame = pd.DataFrame(
            {
                "score": self.scores_,
                "std": self.fold_scores_.std(1),
                "importance": [self.importances()[l] for l in self.layers_],
            },
            index=pd.Index(self.layers_, name="layer"),
        )
        if self.layer_names_:
            frame.insert(0, "name", [self.layer_names_[l] for l in self.layers_])
        frame.attrs.update(metric=self._metric(), baseline=self.baseline_, cv=int(self.cv))
        return frame

    def plot(self, path: str | None = None, *, figsize: Sequence[float] | None = None):
        """Mean cross-validated score per layer (± std over folds), the baseline drawn.

        Needs matplotlib (``pip install 'loes[plot]'``); uses the
        :class:`matplotlib.figure.Figure` API (no pyplot state).

        Parameters
        ----------
        path : str or path, optional
            Also write the figure there (PNG, SVG, PDF by extension).
        figsize : (width, height), optional

        Returns
        -------
        matplotlib.figure.Figure
            One axis; its first line has one point per swept layer.
        """
        self._check_fitted()
        require("matplotlib", extra="plot")
        from matplotlib.figure import Figure

        n = len(self.layers_)
        fig = Figure(figsize=figsize or (max(5.0, 0.3 * n + 2.5), 3.4), layout="constrained")
        ax = fig.subplots()
        ax.errorbar(
            self.layers_,
            self.scores_,
            yerr=self.fold_scores_.std(1),
            marker="o",
            ms=4,
            capsize=2,
            color="#1f77b4",
            label=f"{self._validation_label()} {self._metric()}",
        )
        baseline = "majority class" if self.task_ == "classification" else "predicting the mean"
        ax.axhline(
            self.baseline_,
            color="#7f7f7f",
            ls="--",
            lw=1,
            label=f"{baseline} ({self.baseline_:.3f})",
        )
        best = self.best_layer()
        ax.plot(
            [best],
            [self.scores_[self.layers_.index(best)]],
            "o",
            ms=9,
            mfc="none",
            color="#d62728",
            label=f"best: {layer_label(best, self.layer_names_)}",
        )
        ax.set_xticks(self.layers_ if n <= 32 else self.layers_[::2])
        ax.set_xlabel("layer")
        ax.set_ylabel(self._metric())
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title("single-layer linear probe per layer", fontsize=10)
        if path is not None:
            fig.savefig(str(path), dpi=110)
        return fig

    def _metric(self) -> str:
        return "accuracy" if self.task_ == "classification" else "R²"

    def _validation_label(self) -> str:
        return {"shard_cv": f"{self.cv}-fold CV over batches", "holdout": "held-out"}.get(
            getattr(self, "validation_", "cv"), f"{self.cv}-fold CV"
        )

    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "task": self.task_,
            "layers": list(self.layers_),
            "layer_names": self.layer_names_,
            "scores": self.scores_.tolist(),
            "fold_scores": self.fold_scores_.tolist(),
            "baseline": self.baseline_,
            "best_layer": self.best_layer(),
            "importances": {str(k): v for k, v in self.importances().items()},
            "cv": int(self.cv),
            "validation": getattr(self, "validation_", "cv"),
            "random_state": self.random_state,
        }

    def _check_fitted(self) -> None:
        if not hasattr(self, "scores_"):
            raise LOESError(
                "this LayerSweep is not fitted yet: call fit(embeddings, targets) first"
            )


def _score(pred: np.ndarray, y: np.ndarray, labels: np.ndarray, task: str) -> float:
    if task == "classification":
        return float((pred.argmax(1) == labels).mean())
    sst = ((y - y.mean(0)) ** 2).sum()
    sse = ((y - pred) ** 2).sum()
    return float(1.0 - sse / sst) if sst > 0 else 0.0


def sweep_layers(
    embeddings: Any,
    targets: Any,
    task: str | None = None,
    *,
    cv: int = 5,
    layers: Any = "all",
    random_state: int = 0,
    show_progress: ProgressSetting = "auto",
    layer_names: Sequence[str] | None = None,
    **kwargs: Any,
) -> LayerSweep:
    """Fit a :class:`LayerSweep` and return it (``layer_names``: see :meth:`LayerSweep.fit`).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 4, 6)); y = X[:, 2, 0] + 0.1 * rng.normal(size=200)
    >>> sweep = sweep_layers(X, y, "regression", show_progress=False)
    >>> sweep.best_layer(), bool(sweep.scores_[2] > 0.9)
    (2, True)
    """
    return LayerSweep(
        task, cv=cv, layers=layers, random_state=random_state, show_progress=show_progress, **kwargs
    ).fit(embeddings, targets, layer_names)


def _reiterable(source: Any) -> bool:
    """Whether ``source`` can be read more than once (a function, or an iterable that is
    not itself an iterator)."""
    return callable(source) or (isinstance(source, Iterable) and not isinstance(source, Iterator))


def _open(source: Any) -> Iterator[Any]:
    """A fresh pass over ``source``: call it if it is a function, else iterate it."""
    items = source() if callable(source) else source
    if not isinstance(items, Iterable):
        raise LOESError(
            "batches must be an iterable of (x, y) pairs or a function returning one; "
            f"got {type(items).__name__}"
        )
    return iter(items)


def _merged(parts: Sequence[Moments]) -> Moments:
    """The merge of ``parts`` (a new object)."""
    out = parts[0].copy()
    for m in parts[1:]:
        out.merge(m)
    return out


def sweep_layers_streaming(
    batches: Any,
    test_batches: Any = None,
    *,
    task: str | None = None,
    classes: Sequence[Any] | None = None,
    cv: int = 5,
    layers: Any = "all",
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    show_progress: ProgressSetting = "auto",
    layer_names: Sequence[str] | None = None,
) -> LayerSweep:
    """Fit a :class:`LayerSweep` from a stream of ``(x, y)`` batches (:meth:`LayerSweep.fit_stream`).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(400, 3, 5)); y = x[:, 1, 0] + 0.1 * rng.normal(size=400)
    >>> train = [(x[i : i + 50], y[i : i + 50]) for i in range(0, 300, 50)]
    >>> sweep = sweep_layers_streaming(train, [(x[300:], y[300:])], task="regression",
    ...                                show_progress=False)
    >>> sweep.best_layer(), bool(sweep.scores_[1] > 0.95)
    (1, True)
    """
    return LayerSweep(
        task, cv=cv, layers=layers, alphas=alphas, show_progress=show_progress
    ).fit_stream(batches, test_batches, classes=classes, layer_names=layer_names)
