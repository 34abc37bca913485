"""Linear probes on selected layers: closed-form ridge and logistic regression.

Both probes take the same input as the selector — embeddings of shape
(n_samples, n_layers, dim) or a list of (n_samples, dim_l) layers — keep the
layers they were told to use, standardise each layer with statistics of the
training split, concatenate them and fit a linear model. Their regularisation
is chosen on a validation split (given explicitly, or carved out of the
training data with a seeded split), never on test data.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from loes._deps import require
from loes._exceptions import LOESError
from loes._linalg import LayerStandardizer, RidgePath, inverse_std
from loes._rng import seed_of
from loes._splits import holdout_split as _holdout_split
from loes._splits import split_indices
from loes._validation import check_embeddings, normalize_task
from loes.stats import MomentRidge, Moments
from loes.store import FeatureStore

__all__ = [
    "LayerStandardizer",
    "LinearProbe",
    "encode_labels",
    "split_indices",
    "take_layers",
    "task_score",
]

logger = logging.getLogger(__name__)

#: Relative ridge strengths tried on the validation split (multiples of the
#: mean non-zero eigenvalue of the training Gram matrix).
RIDGE_GRID = tuple(float(v) for v in np.logspace(-4, 2, 13))
#: Inverse regularisation strengths tried for the logistic probe.
LOGISTIC_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


# ------------------------------------------------------------------ helpers
def take_layers(embeddings: Any, layers: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Validate ``embeddings`` and take the given layers (columns) as float64 tensors.

    Parameters
    ----------
    embeddings : array of shape (n_samples, n_layers, dim) or list of (n_samples, dim_l)
    layers : sequence of int, optional
        Indices to keep, in order; all layers when None.

    Returns
    -------
    list of torch.Tensor of shape (n_samples, dim_l), float64, on the CPU
    """
    all_layers = check_embeddings(embeddings)
    if layers is None:
        layers = range(len(all_layers))
    layers = [int(i) for i in layers]
    if not layers:
        raise LOESError("layers is empty: pass at least one layer index")
    bad = [i for i in layers if not 0 <= i < len(all_layers)]
    if bad:
        raise LOESError(
            f"layer indices {bad} are out of range for embeddings with {len(all_layers)} layers"
        )
    return [all_layers[i].detach().to("cpu", torch.float64) for i in layers]


def select_layers(embeddings: Any, layers: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Deprecated alias of :func:`take_layers` (it selects nothing: it takes the given layers)."""
    warnings.warn(
        "loes.transfer.select_layers is deprecated; use loes.transfer.take_layers",
        DeprecationWarning,
        stacklevel=2,
    )
    return take_layers(embeddings, layers)


def encode_labels(labels: Any, classes: Sequence[Any] | None = None):
    """Map labels of any values to ids ``0..C-1``.

    Returns ``(ids, classes)``; with ``classes`` given, labels not among them
    get id ``-1`` (always counted as wrong).
    """
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.ndim != 1:
        raise LOESError(f"class labels must be 1-D; got shape {arr.shape}")
    if classes is None:
        classes_arr, ids = np.unique(arr, return_inverse=True)
        return torch.from_numpy(ids.reshape(-1).astype(np.int64)), list(classes_arr.tolist())
    lookup = {c: i for i, c in enumerate(classes)}
    ids = np.array([lookup.get(v, -1) for v in arr.tolist()], dtype=np.int64)
    return torch.from_numpy(ids), list(classes)


def _regression_targets(targets: Any, n: int) -> torch.Tensor:
    arr = (
        targets.detach().cpu().numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    )
    if arr.shape[0] != n:
        raise LOESError(f"targets must have one row per sample ({n}); got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise LOESError(f"regression targets must be numeric; got dtype {arr.dtype}")
    return torch.from_numpy(np.asarray(arr, dtype=np.float64).reshape(n, -1))


def task_score(pred: Any, truth: Any, task: str) -> float:
    """The score of predictions, higher is better (scikit-learn's convention).

    Classification: accuracy of predicted vs true label ids. Regression: the
    coefficient of determination ``R² = 1 − Σ(y − ŷ)² / Σ(y − ȳ)²``, the sums
    running over samples and target columns (scikit-learn's
    ``r2_score(multioutput="variance_weighted")``; for one column its plain
    ``r2_score``). Constant truth: 1.0 for a perfect prediction, else 0.0
    (scikit-learn's ``force_finite``).

    Parameters
    ----------
    pred, truth : array of shape (n_samples,) or (n_samples, m)
    task : {"classification", "regression"}

    Examples
    --------
    >>> task_score([1.0, 2.0, 3.0], [1.0, 2.0, 4.0], "regression")
    0.7857142857142857
    """
    pred = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred)
    truth = torch.as_tensor(np.asarray(truth) if not isinstance(truth, torch.Tensor) else truth)
    if normalize_task(task) == "classification":
        return float((pred.reshape(-1) == truth.reshape(-1)).double().mean())
    y = truth.double().reshape(truth.shape[0], -1)
    sse = float(((pred.double().reshape(y.shape[0], -1) - y) ** 2).sum())
    sst = float(((y - y.mean(0, keepdim=True)) ** 2).sum())
    if sst == 0.0:
        return 1.0 if sse == 0.0 else 0.0
    return 1.0 - sse / sst


# -------------------------------------------------------------------- probe
class LinearProbe:
    """A ridge or logistic probe on the concatenation of selected layers.

    Parameters
    ----------
    layers : sequence of int, optional
        Layer indices to use (all when None).
    kind : {"ridge", "logistic"}
        ``"ridge"``: closed-form ridge regression (one-hot targets for
        classification, prediction = argmax). ``"logistic"``: multinomial
        logistic regression (scikit-learn, L-BFGS); classification only.
    task : {"classification", "regression"}
    grid : sequence of float, optional
        Regularisation values tried on the validation split: relative ridge
        strengths (:data:`RIDGE_GRID`) or logistic ``C`` values
        (:data:`LOGISTIC_GRID`).
    val_fraction : float
        Share of the training data held out for model selection when ``fit``
        gets no validation split.
    random_state : int, optional
        Seed of that held-out split and of the logistic solver.

    Attributes
    ----------
    best_param_ : float
        The regularisation value chosen on validation.
    val_scores_ : dict of float to float
        Validation accuracy (classification) or R² (regression) of each value.
    classes_ : list
        Class labels (classification).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(300, 4, 8))
    >>> y = (X[:, 2, 0] > 0).astype(int)           # layer 2 carries the rule
    >>> probe = LinearProbe(layers=[2]).fit(X[:200], y[:200])
    >>> probe.score(X[200:], y[200:]) > 0.9
    True
    """

    def __init__(
        self,
        layers: Sequence[int] | None = None,
        *,
        kind: str = "ridge",
        task: str = "classification",
        grid: Sequence[float] | None = None,
        val_fraction: float = 0.2,
        random_state: int | None = 0,
    ):
        self.layers = layers
        self.kind = kind
        self.task = task
        self.grid = grid
        self.val_fraction = val_fraction
        self.random_state = random_state

    # ------------------------------------------------------------- fitting
    def fit(
        self,
        embeddings: Any,
        targets: Any = None,
        val_embeddings: Any = None,
        val_targets: Any = None,
    ):
        """Fit on training data; choose the regularisation on the validation split.

        Parameters
        ----------
        embeddings : array of shape (n_train, n_layers, dim), list of layers, or FeatureStore
            A :class:`~loes.store.FeatureStore` (:func:`loes.store.load_features`)
            is streamed: its rows are read shard by shard into float64 moments
            (:class:`loes.stats.Moments` of the concatenated layers, ``(Σ D_l)²``
            floats whatever the number of rows), standardised and solved exactly
            as in memory (tested equal to 1e-12). ``layers`` are then the
            model's layer indices as stored (default: all stored layers), the
            targets are the store's own, ``kind`` must be ``"ridge"``, and the
            strength is chosen on ``val_embeddings`` (another store) or, without
            one, by generalised cross-validation on the training moments.
        targets : array of shape (n_train,) (labels) or (n_train,) / (n_train, m) numbers
            (None for a store)
        val_embeddings, val_targets : optional
            The validation split. Without it, ``val_fraction`` of the training
            data is held out for the choice and the probe is refitted on all of
            it with the chosen value.

        Returns
        -------
        self
        """
        task = normalize_task(self.task)
        if task == "label_free":
            raise LOESError("a probe needs targets: task must be 'classification' or 'regression'")
        if self.kind not in ("ridge", "logistic"):
            raise LOESError(f"kind must be 'ridge' or 'logistic'; got {self.kind!r}")
        if self.kind == "logistic" and task != "classification":
            raise LOESError(
                "the logistic probe is for classification; use kind='ridge' for regression"
            )
        self.task_ = task
        if isinstance(embeddings, FeatureStore):
            return self._fit_store(embeddings, val_embeddings)
        if targets is None:
            raise LOESError("fit needs targets (one per row), or a feature store that has them")
        self.__dict__.pop("store_layers_", None)
        layers = take_layers(embeddings, self.layers)
        n = layers[0].shape[0]
        y = self._encode(targets, n, fit=True)
        if val_embeddings is None:
            strat = y if task == "classification" else None
            fit_idx, val_idx = _holdout_split(n, self.val_fraction, self.random_state, strat)
            if len(val_idx) == 0:
                raise LOESError(f"too few training samples ({n}) to hold out a validation split")
            tr_layers = [x[fit_idx] for x in layers]
            va_layers = [x[val_idx] for x in layers]
            y_tr, y_va = y[fit_idx], y[val_idx]
        else:
            if val_targets is None:
                raise LOESError("val_embeddings was given without val_targets")
            tr_layers, y_tr = layers, y
            va_layers = take_layers(val_embeddings, self.layers)
            y_va = self._encode(val_targets, va_layers[0].shape[0], fit=False)
        self.val_scores_ = self._search(tr_layers, y_tr, va_layers, y_va)
        best_score = max(self.val_scores_.values())
        # ties: the strongest regularisation that reaches the best score
        candidates = [p for p, s in self.val_scores_.items() if s == best_score]
        self.best_param_ = max(candidates) if self.kind == "ridge" else min(candidates)
        self.best_val_score_ = best_score
        if val_embeddings is None:  # refit on all training data with the chosen value
            self._fit_one(layers, y, self.best_param_)
        else:
            self._fit_one(tr_layers, y_tr, self.best_param_)
        return self

    def _fit_store(self, store: FeatureStore, val: Any) -> LinearProbe:
        """Ridge from streamed float64 moments of the store's rows (see :meth:`fit`)."""
        if self.kind != "ridge":
            raise LOESError(
                "a probe fitted on a feature store streams its rows: use kind='ridge' (or a "
                "FusionProbe); kind='logistic' needs the rows in memory (store.load())"
            )
        if val is not None and not isinstance(val, FeatureStore):
            raise LOESError("with a feature store, val_embeddings must be a feature store too")
        self.store_layers_ = list(self.layers) if self.layers is not None else store.layers
        if store.targets is None:
            raise LOESError(f"the feature store {store.path} has no targets to fit a probe on")
        classes = store.classes if self.task_ == "classification" else None
        if classes is not None:
            if len(classes) < 2:
                raise LOESError("classification needs at least 2 classes in the training split")
            self.classes_ = classes
        raw = Moments(task=self.task_, classes=classes)
        for x, y in store.batches(layers=self.store_layers_):
            raw.update(_flat(x), y)
        # the in-memory standardiser's statistics, from the moments (ddof 0, same constant rule)
        mean = torch.from_numpy(raw.mean).reshape(1, -1)
        inv_std = inverse_std(mean, torch.from_numpy(np.diag(raw.m2) / raw.n).sqrt().reshape(1, -1))
        widths = [store.widths[store.layers.index(i)] for i in self.store_layers_]
        self.standardizer_ = LayerStandardizer().set_stats(
            mean.split(widths, dim=1), inv_std.split(widths, dim=1)
        )
        scale = torch.cat(self.standardizer_.scales_, dim=1).reshape(-1).numpy()
        ridge = MomentRidge(raw.affine(scale, raw.mean))
        grid = [float(r) for r in self.grid or RIDGE_GRID]
        fits = {r: ridge.coef(r) for r in grid}
        if val is None:  # no held-out rows: generalised cross-validation on the moments
            self.validation_ = "gcv"
            self.val_scores_ = {r: -ridge.gcv(r) for r in grid}
        else:
            self.validation_ = "validation store"
            outs = {r: [] for r in grid}
            truth = []
            for x, y in val.batches(layers=self.store_layers_):
                z = self.standardizer_.transform(take_layers(x))
                for r, (w, b) in fits.items():
                    outs[r].append(z.numpy() @ w + b)
                truth.append(y)
            y_va = self._encode(np.concatenate(truth), sum(len(t) for t in truth), fit=False)
            self.val_scores_ = {
                r: self._score_matrix(torch.from_numpy(np.concatenate(o)), y_va)
                for r, o in outs.items()
            }
        best_score = max(self.val_scores_.values())
        self.best_param_ = max(r for r, v in self.val_scores_.items() if v == best_score)
        self.best_val_score_ = best_score
        w, b = fits[self.best_param_]
        self.coef_, self.intercept_ = torch.from_numpy(w), torch.from_numpy(b)
        return self

    def _encode(self, targets: Any, n: int, fit: bool) -> torch.Tensor:
        if self.task_ == "classification":
            if isinstance(targets, (torch.Tensor, np.ndarray)) and np.ndim(targets) == 2:
                targets = np.asarray(torch.as_tensor(np.asarray(targets)).argmax(1))
            ids, classes = encode_labels(targets, None if fit else self.classes_)
            if ids.shape[0] != n:
                raise LOESError(f"targets must have one label per sample ({n}); got {ids.shape[0]}")
            if fit:
                if len(classes) < 2:
                    raise LOESError("classification needs at least 2 classes in the training split")
                self.classes_ = classes
            return ids
        return _regression_targets(targets, n)

    def _design(self, layers: list[torch.Tensor], fit: bool) -> torch.Tensor:
        if fit:
            self.standardizer_ = LayerStandardizer().fit(layers)
        return self.standardizer_.transform(layers)

    def _search(self, tr_layers, y_tr, va_layers, y_va):
        x_tr = self._design(tr_layers, fit=True)
        x_va = self.standardizer_.transform(va_layers)
        if self.kind == "ridge":
            return self._ridge_path(x_tr, y_tr, x_va, y_va)
        scores = {}
        for c in self.grid or LOGISTIC_GRID:
            model = self._logistic(float(c)).fit(x_tr.numpy(), y_tr.numpy())
            scores[float(c)] = task_score(
                torch.from_numpy(model.predict(x_va.numpy())), y_va, "classification"
            )
        return scores

    def _targets_matrix(self, y: torch.Tensor) -> torch.Tensor:
        if self.task_ == "classification":
            return torch.nn.functional.one_hot(y, len(self.classes_)).double()
        return y

    def _ridge_path(self, x_tr, y_tr, x_va, y_va):
        """Validation score of every grid value from one :class:`~loes._linalg.RidgePath`."""
        path = RidgePath(x_tr, self._targets_matrix(y_tr))
        return {
            float(rel): self._score_matrix(path.predict(float(rel), x_va), y_va)
            for rel in self.grid or RIDGE_GRID
        }

    def _score_matrix(self, pred: torch.Tensor, y: torch.Tensor) -> float:
        if self.task_ == "classification":
            return task_score(pred.argmax(1), y, "classification")
        return task_score(pred, y, "regression")

    def _logistic(self, c: float):
        linear_model = _sklearn_linear_model()
        return linear_model.LogisticRegression(
            C=c, max_iter=500, random_state=seed_of(self.random_state), tol=1e-4
        )

    def _fit_one(self, layers, y, param):
        x = self._design(layers, fit=True)
        if self.kind == "ridge":
            self.coef_, self.intercept_ = RidgePath(x, self._targets_matrix(y)).coef(param)
        else:
            self.model_ = self._logistic(param).fit(x.numpy(), y.numpy())

    # ---------------------------------------------------------- predicting
    def decision_function(self, embeddings: Any) -> torch.Tensor:
        """Raw outputs (n_samples, n_outputs): ridge fits or logistic logits."""
        self._check_fitted()
        if isinstance(embeddings, FeatureStore):
            layers = getattr(self, "store_layers_", self.layers)
            return torch.cat(
                [self.decision_function(x) for x, _ in embeddings.batches(layers=layers)]
            )
        layers = None if hasattr(self, "store_layers_") else self.layers
        x = self.standardizer_.transform(take_layers(embeddings, layers))
        if self.kind == "ridge":
            return x @ self.coef_ + self.intercept_
        return torch.from_numpy(
            np.asarray(self.model_.decision_function(x.numpy()), dtype=np.float64)
        )

    def predict(self, embeddings: Any):
        """Class labels (classification) or predicted values (regression)."""
        out = self.decision_function(embeddings)
        if self.task_ == "classification":
            if out.ndim == 1:  # binary logistic
                ids = (out > 0).long()
            else:
                ids = out.argmax(1)
            return np.asarray(self.classes_)[ids.numpy()]
        return out.squeeze(1).numpy() if out.shape[1] == 1 else out.numpy()

    def score(self, embeddings: Any, targets: Any = None) -> float:
        """Accuracy (classification) or R² (regression) on the given data: higher is better.

        ``targets`` may be omitted for a feature store (its own targets are used).
        """
        self._check_fitted()
        if isinstance(embeddings, FeatureStore) and targets is None:
            targets = embeddings.targets
        if targets is None:
            raise LOESError("score needs targets (or a feature store that has them)")
        pred = self.predict(embeddings)
        if self.task_ == "classification":
            ids_pred, _ = encode_labels(np.asarray(pred), self.classes_)
            ids_true = self._encode(targets, len(pred), fit=False)
            return task_score(ids_pred, ids_true, "classification")
        truth = _regression_targets(targets, len(pred))
        return task_score(torch.as_tensor(pred), truth, "regression")

    def _check_fitted(self):
        if not hasattr(self, "standardizer_"):
            raise LOESError("this probe is not fitted yet: call fit(embeddings, targets) first")


def _flat(x: Any) -> torch.Tensor:
    """A store batch, (n, k, D) or a list of (n, D_l), as one (n, Σ D_l) matrix of its layers."""
    return x.flatten(1) if torch.is_tensor(x) else torch.cat(list(x), dim=1)


def _sklearn_linear_model():
    return require("sklearn.linear_model", extra="sklearn", package="scikit-learn")
