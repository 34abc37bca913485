"""Layer sweep: one linear probe per layer from one extraction, scored by cross-validation.

The probe is closed-form ridge on each layer's centred features (one-hot
targets and arg-max prediction for classification). Within each training fold
the ridge strength is chosen by generalised cross-validation from one SVD, so
the held-out fold is never used to tune anything; the score is accuracy
(classification) or R² (regression), averaged over folds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
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

__all__ = ["LayerSweep", "ridge_gcv_fit", "sweep_layers"]

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
    path = RidgePath(x, y)
    if path.trace <= 0:  # constant layer: predict the mean
        return np.zeros((x.shape[1], path.yc.shape[1])), path.y_mean[0].numpy(), float("inf")
    gcv = [float((path.gcv_residuals(a) ** 2).sum()) for a in alphas]
    best = alphas[int(np.argmin(np.nan_to_num(gcv, nan=np.inf)))]
    w, b = path.coef(best)
    return w.numpy(), b.numpy(), path.penalty(best)


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
    fold_scores_ : ndarray of shape (n_swept, cv)
    baseline_ : float
        Majority-class accuracy (classification) or 0 (R² of the mean).
    coefs_ : list of (w, b)
        Each layer's probe refitted on all samples.
    layer_names_ : list of str or None
        The model's name of every layer (all, not only the swept ones), when known.

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
        if (
            isinstance(self.cv, bool)
            or not isinstance(self.cv, (int, np.integer))
            or not 2 <= self.cv <= n
        ):
            raise LOESError(f"cv must be an integer between 2 and n_samples ({n}); got {self.cv!r}")
        self.task_ = task
        self.layers_ = resolve_layers(self.layers, len(all_layers))
        folds = kfold(n, int(self.cv), self.random_state, labels)
        truth = labels if task == "classification" and labels is not None else y.argmax(1)
        if task == "classification":
            self.baseline_ = float(np.bincount(truth).max() / n)
        else:
            self.baseline_ = 0.0
        self.fold_scores_ = np.zeros((len(self.layers_), len(folds)))
        self.coefs_ = []
        for row, layer in enumerate(
            progress(self.layers_, self.show_progress, desc="layer sweep", unit="layer")
        ):
            x = all_layers[layer].detach().cpu().double().numpy()
            for f, (train, held) in enumerate(folds):
                w, b, _ = ridge_gcv_fit(x[train], y[train], self.alphas)
                pred = x[held] @ w + b
                self.fold_scores_[row, f] = _score(pred, y[held], truth[held], task)
            self.coefs_.append(ridge_gcv_fit(x, y, self.alphas)[:2])
        self.scores_ = self.fold_scores_.mean(1)
        self.classes_ = tgt.classes
        logger.info("layer sweep: best layer %d (%.4f)", self.best_layer(), self.scores_.max())
        return self

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
            label=f"{self.cv}-fold CV {self._metric()}",
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
