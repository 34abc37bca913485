"""Layer specifications: turn ``"middle"``, ``"sweep:2"``, ``"loes"``, ``"auto"``, ... into indices.

:func:`resolve_layers` is what every function that takes a layer set calls.
The ``"auto"`` and ``"fast_auto"`` specs fit a group lasso over layers
(:class:`GroupLassoLayers`): each layer is one coefficient block, so the
penalty switches whole layers on or off.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from loes._estimate import calibration_cv, choose_layers
from loes._exceptions import LOESError, LOESWarning
from loes._linalg import LayerStandardizer, column_stats
from loes._splits import split_indices
from loes._validation import check_embeddings, check_k, check_targets, normalize_task
from loes.core import select_layers_from_custom_embeddings

__all__ = ["LAYER_SPECS", "GroupLassoLayers", "infer_task", "resolve_layers"]

logger = logging.getLogger(__name__)

#: The named specs (besides ints, lists, "sweep:N" and "sweep:A-B").
LAYER_SPECS = ("first", "middle", "last", "all", "sweep", "loes", "auto", "fast_auto")

_DEFAULT_K = 4


def infer_task(targets: Any) -> str:
    """``"classification"`` for integer, bool or string labels (or a 2-D
    one-hot matrix), ``"regression"`` for other float targets."""
    arr = (
        targets.detach().cpu().numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    )
    if arr.dtype.kind in "iubOSU":
        return "classification"
    if (
        arr.ndim == 2
        and arr.shape[1] > 1
        and np.all((arr == 0) | (arr == 1))
        and np.all(arr.sum(1) == 1)
    ):
        return "classification"
    return "regression"


def _index(i: int, n_layers: int, spec: Any) -> int:
    if not -n_layers <= i < n_layers:
        raise LOESError(
            f"layer {i} is out of range for a model with {n_layers} layers "
            f"(valid: 0..{n_layers - 1}, or -{n_layers}..-1 from the end); spec was {spec!r}"
        )
    return i % n_layers


def resolve_layers(
    spec: Any,
    n_layers: int,
    *,
    embeddings: Any = None,
    targets: Any = None,
    task: str | None = None,
    k: int | None = None,
    random_state: int = 0,
    **options: Any,
) -> list[int]:
    """Turn a layer specification into a list of layer indices.

    Parameters
    ----------
    spec : int, sequence of int, or str
        - an int (negative counts from the end: -1 is the last layer);
        - a list/tuple/range of ints, or a string ``"1,4,-1"``;
        - ``"first"``, ``"middle"`` (``n_layers // 2``), ``"last"``;
        - ``"all"`` / ``"sweep"``: every layer; ``"sweep:N"``: every Nth
          layer from layer 0 (``0, N, 2N, ...``); ``"sweep:A-B"``: layers A
          to B inclusive (negative ends allowed, e.g. ``"sweep:-4--1"``);
        - ``"loes"``: the k layers LOES selects (needs ``embeddings``; uses
          ``targets`` when given, else label-free);
        - ``"auto"``: the layers a cross-validated group lasso keeps (needs
          ``embeddings`` and ``targets``); with k, the first k of them by block
          norm; without, the same rule as ``k="auto"``
          (:func:`loes._estimate.choose_layers`) cuts the lasso's order;
        - ``"fast_auto"``: the top-k layers by coefficient-block norm of one
          group-lasso path without cross-validation.
    n_layers : int
        Number of layers available (index 0 = first transformer block).
    embeddings : array of shape (n_samples, n_layers, dim) or list of layers, optional
    targets : array of shape (n_samples,) or (n_samples, m), optional
    task : {"classification", "regression", "label_free"}, optional
        Inferred from ``targets`` when omitted (:func:`infer_task`).
    k : int, optional
        Layer budget for ``"loes"`` and ``"fast_auto"`` (default
        ``min(4, n_layers)``) and a cap for ``"auto"``.
    random_state : int
    **options
        Passed to the LOES selector or to :class:`GroupLassoLayers`.

    Returns
    -------
    list of int
        Non-negative indices, in the spec's order (selection order for
        ``"loes"``; decreasing block norm for ``"auto"``/``"fast_auto"``).

    Examples
    --------
    >>> resolve_layers(-1, 6), resolve_layers("middle", 6), resolve_layers("sweep:2", 6)
    ([5], [3], [0, 2, 4])
    >>> resolve_layers("sweep:-3--1", 12), resolve_layers([0, -1], 12)
    ([9, 10, 11], [0, 11])
    """
    if isinstance(n_layers, bool) or not isinstance(n_layers, (int, np.integer)) or n_layers < 1:
        raise LOESError(f"n_layers must be a positive integer; got {n_layers!r}")
    n_layers = int(n_layers)
    if isinstance(spec, bool):
        raise LOESError(f"a layer spec cannot be a bool; got {spec!r}")
    if isinstance(spec, (int, np.integer)):
        return [_index(int(spec), n_layers, spec)]
    if isinstance(spec, (list, tuple, range, np.ndarray, torch.Tensor)):
        items = spec.tolist() if hasattr(spec, "tolist") else list(spec)
        if not items:
            raise LOESError("the layer list is empty: pass at least one layer index")
        if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in items):
            raise LOESError(f"a layer list must hold integers; got {items!r}")
        out = [_index(int(i), n_layers, spec) for i in items]
        dup = sorted({i for i in out if out.count(i) > 1})
        if dup:
            raise LOESError(f"layer list {items!r} names layers {dup} more than once")
        return out
    if not isinstance(spec, str):
        raise LOESError(
            f"layer spec must be an int, a list of ints or a string such as 'middle'; got {type(spec).__name__}"
        )
    text = spec.strip().lower().replace(" ", "")
    if re.fullmatch(r"-?\d+(,-?\d+)*", text):
        return resolve_layers([int(t) for t in text.split(",")], n_layers)
    if text == "first":
        return [0]
    if text == "middle":
        return [n_layers // 2]
    if text == "last":
        return [n_layers - 1]
    if text in ("all", "sweep"):
        return list(range(n_layers))
    if text.startswith("sweep:"):
        return _sweep_spec(text[len("sweep:") :], n_layers, spec)
    if text == "loes":
        return _loes_spec(n_layers, embeddings, targets, task, k, random_state, options)
    if text in ("auto", "fast_auto"):
        layers, y, task = _supervised_inputs(text, n_layers, embeddings, targets, task)
        if text == "auto":
            model = GroupLassoLayers(task=task, random_state=random_state, **options).fit(layers, y)
            chosen = model.selected_layers_
            if not chosen:
                raise LOESError(
                    "the cross-validated group lasso kept no layer (the targets look unpredictable "
                    "from these embeddings); use 'fast_auto' with k to force a choice"
                )
            if k is not None:
                return chosen[:k]
            # the same evidence as k="auto": the largest of {last layer, prefixes of the lasso's
            # order} within CHOICE_TOLERANCE paired SEs of the best held-out squared error
            checked = check_embeddings(layers)
            tgt = check_targets(y, task, checked[0].shape[0])
            if tgt.keep is not None:
                checked = [layer[tgt.keep.to(layer.device)] for layer in checked]
            cv = calibration_cv(checked, tgt, task, random_state)
            return choose_layers(cv, chosen, n_layers - 1)[0]
        k = check_k(k if k is not None else min(_DEFAULT_K, n_layers), n_layers)
        options.setdefault("cv", None)
        model = GroupLassoLayers(task=task, random_state=random_state, **options)
        return model.fit_top_k(layers, y, k).selected_layers_
    raise LOESError(
        f"unknown layer spec {spec!r}: use an int, a list of ints, 'first', 'middle', 'last', "
        "'all', 'sweep', 'sweep:N', 'sweep:A-B', 'loes', 'auto' or 'fast_auto'"
    )


def _sweep_spec(arg: str, n_layers: int, spec: str) -> list[int]:
    m = re.fullmatch(r"(-?\d+)-(-?\d+)", arg)
    if m:
        a, b = (_index(int(v), n_layers, spec) for v in m.groups())
        if a > b:
            raise LOESError(
                f"sweep range {spec!r} is empty: start layer {a} is after end layer {b}"
            )
        return list(range(a, b + 1))
    if re.fullmatch(r"\d+", arg):
        step = int(arg)
        if step < 1:
            raise LOESError(f"sweep step must be >= 1; got {spec!r}")
        return list(range(0, n_layers, step))
    raise LOESError(
        f"malformed sweep spec {spec!r}: use 'sweep:N' (every Nth layer) or 'sweep:A-B'"
    )


def _layers_for(spec: str, n_layers: int, embeddings: Any) -> list[torch.Tensor]:
    if embeddings is None:
        raise LOESError(
            f"layer spec {spec!r} needs embeddings (n_samples, n_layers, dim) to choose from"
        )
    layers = check_embeddings(embeddings)
    if len(layers) != n_layers:
        raise LOESError(f"embeddings have {len(layers)} layers but n_layers={n_layers}")
    return layers


def _loes_spec(n_layers, embeddings, targets, task, k, random_state, options) -> list[int]:
    layers = _layers_for("loes", n_layers, embeddings)
    k = check_k(k if k is not None else min(_DEFAULT_K, n_layers), n_layers)
    if task is None:
        task = "label_free" if targets is None else infer_task(targets)
    options.setdefault("show_progress", False)
    res = select_layers_from_custom_embeddings(
        layers, targets, k, task=task, random_state=random_state, **options
    )
    return list(res.selected_layers)


def _supervised_inputs(spec, n_layers, embeddings, targets, task):
    layers = _layers_for(spec, n_layers, embeddings)
    if targets is None:
        raise LOESError(
            f"layer spec {spec!r} fits a probe and needs targets; for label-free use 'loes'"
        )
    task = normalize_task(task) if task is not None else infer_task(targets)
    if task == "label_free":
        raise LOESError(f"layer spec {spec!r} needs task='classification' or 'regression'")
    return layers, targets, task


# ---------------------------------------------------------------- group lasso
class GroupLassoLayers:
    """Group lasso over layers, with a regularisation path and cross-validation.

    Features are standardised per column and each layer block divided by
    ``sqrt(dim_l)`` (the usual group weight), then the model minimises
    ``loss(XW + b, Y) + λ Σ_l ‖W_l‖_F`` by accelerated proximal gradient
    (FISTA) with block soft-thresholding, where ``W_l`` holds layer l's rows of
    the coefficient matrix. The loss is the multinomial cross-entropy
    (classification) or half the mean squared error on standardised targets
    (regression). λ runs on a log grid from ``λ_max`` (every block zero) down to
    ``lambda_min_ratio · λ_max``, warm-starting each fit from the previous one.

    Parameters
    ----------
    task : {"classification", "regression"}, optional
        Inferred from the targets when None.
    cv : int or None
        Folds for choosing λ (stratified for classification); None skips
        cross-validation (:meth:`fit` then keeps the smallest λ).
    n_lambdas : int
    lambda_min_ratio : float
    max_iter : int
        FISTA iterations per λ.
    tol : float
        Stop when the relative change of W falls below it.
    rule : {"1se", "min"}
        ``"min"``: the λ with the lowest mean validation loss; ``"1se"``
        (default): the largest λ within one standard error of that minimum,
        which keeps fewer layers at a statistically indistinguishable loss.
    random_state : int
        Seed of the fold split.

    Attributes
    ----------
    lambdas_ : ndarray of shape (n_lambdas,)
    cv_loss_ : ndarray of shape (n_lambdas,) or None
        Mean validation loss (cross-entropy or MSE on standardised targets).
    best_index_ : int
    lambda_ : float
    path_norms_ : ndarray of shape (n_lambdas, n_layers)
        Block norms along the full-data path.
    block_norms_ : ndarray of shape (n_layers,)
        Block norms at ``lambda_``.
    coef_ : ndarray of shape (sum of dim_l, n_outputs)
        In the standardised feature space.
    intercept_ : ndarray of shape (n_outputs,)
    selected_layers_ : list of int
        Layers with a non-zero block, by decreasing norm.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 3, 240)
    >>> X = rng.normal(size=(240, 5, 6)); X[:, 3, :3] += 2.5 * np.eye(3)[y]
    >>> GroupLassoLayers(cv=3).fit(X, y).selected_layers_[0]
    3
    """

    def __init__(
        self,
        task: str | None = None,
        *,
        cv: int | None = 5,
        n_lambdas: int = 20,
        lambda_min_ratio: float = 1e-2,
        max_iter: int = 300,
        tol: float = 1e-4,
        rule: str = "1se",
        random_state: int = 0,
    ):
        if rule not in ("1se", "min"):
            raise LOESError(f"rule must be '1se' or 'min'; got {rule!r}")
        self.rule = rule
        self.task = task
        self.cv = cv
        self.n_lambdas = n_lambdas
        self.lambda_min_ratio = lambda_min_ratio
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state

    # ------------------------------------------------------------- public
    def fit(self, embeddings: Any, targets: Any) -> GroupLassoLayers:
        """Fit the path, choose λ by cross-validation and refit on all data."""
        x, y, groups, n_layers = self._prepare(embeddings, targets)
        lambdas = self._grid(x, y, groups, n_layers)
        self.cv_loss_ = None
        best = len(lambdas) - 1
        if self.cv is not None:
            folds = self._cross_validate(embeddings, targets, lambdas)
            self.cv_loss_ = folds.mean(0)
            best = int(np.argmin(self.cv_loss_))
            if self.rule == "1se":
                se = folds[:, best].std(ddof=1) / math.sqrt(len(folds))
                best = int(np.flatnonzero(self.cv_loss_ <= self.cv_loss_[best] + se)[0])
        coefs = self._path(x, y, groups, n_layers, lambdas)
        self._finish(lambdas, coefs, best, groups, n_layers)
        return self

    def fit_top_k(self, embeddings: Any, targets: Any, k: int) -> GroupLassoLayers:
        """One path on all data (no CV), stopped at the first λ where at least
        k blocks are non-zero; keep the k largest blocks and refit the model on
        those layers alone at that λ. ``selected_layers_`` are the k layers by
        decreasing block norm; ``refit_layers_``/``coef_`` describe the refit."""
        x, y, groups, n_layers = self._prepare(embeddings, targets)
        k = check_k(k, n_layers)
        lambdas = self._grid(x, y, groups, n_layers)
        coefs = self._path(x, y, groups, n_layers, lambdas, stop_at=k)
        best = len(coefs) - 1
        self.cv_loss_ = None
        self._finish(lambdas[: len(coefs)], coefs, best, groups, n_layers)
        order = np.argsort(-self.block_norms_, kind="stable")[:k]
        top = [int(i) for i in order]
        if (self.block_norms_[order] == 0).any():
            warnings.warn(
                f"only {int((self.block_norms_ > 0).sum())} layers enter the group-lasso path down to "
                f"{self.lambda_min_ratio}·λ_max; the other picks among the top {k} are arbitrary "
                "(lower lambda_min_ratio to rank them)",
                LOESWarning,
                stacklevel=2,
            )
        self.selected_layers_ = top
        # refit on the chosen layers only
        keep = np.concatenate([np.arange(groups[i][0], groups[i][1]) for i in sorted(top)])
        sub_groups, start = [], 0
        for i in sorted(top):
            width = groups[i][1] - groups[i][0]
            sub_groups.append((start, start + width))
            start += width
        w, b = self._solve(x[:, keep], y, sub_groups, float(self.lambda_), None, None)
        self.refit_layers_ = sorted(top)
        self.refit_coef_, self.refit_intercept_ = w, b
        return self

    # ------------------------------------------------------------ helpers
    def _prepare(self, embeddings, targets):
        layers = [t.detach().cpu().double() for t in check_embeddings(embeddings)]
        task = normalize_task(self.task) if self.task is not None else infer_task(targets)
        if task == "label_free":
            raise LOESError("group lasso needs task='classification' or 'regression'")
        self.task_ = task
        tgt = check_targets(targets, task, layers[0].shape[0], ignore_index=None)
        self.classes_ = tgt.classes
        y = tgt.y.double()
        if task == "regression":
            mean, inv_std = column_stats(y)
            y = (y - mean) * inv_std
        self._labels = tgt.labels
        self.standardizer_ = LayerStandardizer().fit(layers)
        x = self.standardizer_.transform(layers).numpy()
        y = y.numpy()
        groups, start = [], 0
        for layer in layers:
            groups.append((start, start + layer.shape[1]))
            start += layer.shape[1]
        return x, y, groups, len(layers)

    # The iterative solver runs in numpy: thousands of small products, where
    # numpy's per-call overhead is far below torch's on a busy CPU.
    def _gradient(self, x, y, w, b):
        out = x @ w + b
        if self.task_ == "classification":
            out = np.exp(out - out.max(1, keepdims=True))
            resid = out / out.sum(1, keepdims=True) - y
        else:
            resid = out - y
        return x.T @ resid / x.shape[0], resid.mean(0)

    def _loss(self, x, y, w, b) -> float:
        out = x @ w + b
        if self.task_ == "classification":
            top = out.max(1, keepdims=True)
            logp = out - top - np.log(np.exp(out - top).sum(1, keepdims=True))
            return float(-(y * logp).sum(1).mean())
        return float(((out - y) ** 2).mean())

    def _init_intercept(self, y):
        if self.task_ == "classification":
            logp = np.log(np.clip(y.mean(0), 1e-12, None))
            return logp - logp.mean()
        return y.mean(0)

    def _grid(self, x, y, groups, n_layers) -> np.ndarray:
        g, _ = self._gradient(x, y, np.zeros((x.shape[1], y.shape[1])), self._init_intercept(y))
        lam_max = max(float(np.linalg.norm(g[a:b])) for a, b in groups)
        if lam_max <= 0:
            raise LOESError(
                "the targets are constant or unrelated to every feature: nothing to fit"
            )
        return lam_max * np.logspace(0, math.log10(self.lambda_min_ratio), self.n_lambdas)

    def _step_size(self, x) -> float:
        """1 / Lipschitz constant of the loss gradient in (W, b)."""
        n, p = x.shape
        small = x @ x.T if n <= p else x.T @ x
        sigma2 = float(np.linalg.eigvalsh(small)[-1])
        lip = (sigma2 + n) / n * (0.5 if self.task_ == "classification" else 1.0)
        return 1.0 / max(lip, 1e-12)

    def _solve(self, x, y, groups, lam, w0, b0, step=None):
        """FISTA with adaptive restart for one λ, from a warm start."""
        step = self._step_size(x) if step is None else step
        w = np.zeros((x.shape[1], y.shape[1])) if w0 is None else w0.copy()
        b = self._init_intercept(y) if b0 is None else b0.copy()
        zw, zb, t = w.copy(), b.copy(), 1.0
        group_id = np.concatenate([np.full(hi - lo, i) for i, (lo, hi) in enumerate(groups)])
        self.n_iter_ = 0
        for _ in range(self.max_iter):
            self.n_iter_ += 1
            gw, gb = self._gradient(x, y, zw, zb)
            w_new = _block_soft_threshold(zw - step * gw, step * lam, group_id, len(groups))
            b_new = zb - step * gb
            dw, db = w_new - w, b_new - b
            change = np.linalg.norm(dw) / max(1.0, np.linalg.norm(w_new))
            if ((zw - w_new) * dw).sum() + ((zb - b_new) * db).sum() > 0:
                t = 1.0  # momentum points uphill: restart (O'Donoghue & Candès)
            t_new = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
            mom = (t - 1.0) / t_new
            zw, zb = w_new + mom * dw, b_new + mom * db
            w, b, t = w_new, b_new, t_new
            if change < self.tol:
                break
        return w, b

    def _path(self, x, y, groups, n_layers, lambdas, stop_at: int | None = None):
        coefs, w, b = [], None, None
        step = self._step_size(x)
        for lam in lambdas:
            w, b = self._solve(x, y, groups, float(lam), w, b, step)
            coefs.append((w, b))
            if stop_at is not None and int((_block_norms(w, groups) > 0).sum()) >= stop_at:
                break
        return coefs

    def _cross_validate(self, embeddings, targets, lambdas) -> np.ndarray:
        layers = check_embeddings(embeddings)
        n = layers[0].shape[0]
        if not 2 <= int(self.cv) <= n:
            raise LOESError(f"cv must be between 2 and n_samples ({n}); got {self.cv}")
        labels = self._labels if self.task_ == "classification" else None
        folds = split_indices(n, [1.0] * int(self.cv), self.random_state, labels)
        y_all = np.asarray(targets.detach().cpu() if isinstance(targets, torch.Tensor) else targets)
        losses = np.zeros((len(folds), len(lambdas)))
        for f, held in enumerate(folds):
            train = np.setdiff1d(np.arange(n), held)
            sub = GroupLassoLayers(self.task_, cv=None, max_iter=self.max_iter, tol=self.tol)
            x_tr, y_tr, groups, n_layers = sub._prepare(
                [layer[train] for layer in layers], y_all[train]
            )
            x_va = sub.standardizer_.transform(
                [layer[held].detach().cpu().double() for layer in layers]
            ).numpy()
            y_va = self._encode_like(sub, y_all[held], y_all[train])
            coefs = sub._path(x_tr, y_tr, groups, n_layers, lambdas)
            losses[f] = [sub._loss(x_va, y_va, w, b) for w, b in coefs]
        return losses

    def _encode_like(self, fitted: GroupLassoLayers, y_held, y_train) -> torch.Tensor:
        """Validation targets in the training fold's encoding."""
        if self.task_ == "classification":
            if y_held.ndim == 2:
                return np.asarray(y_held, dtype=np.float64)
            index = {c: i for i, c in enumerate(fitted.classes_)}
            ids = [index.get(v.item() if hasattr(v, "item") else v, -1) for v in y_held]
            out = torch.zeros(len(ids), len(fitted.classes_), dtype=torch.float64)
            for row, c in enumerate(ids):
                if c >= 0:  # a class missing from the training fold contributes no loss
                    out[row, c] = 1.0
            return out.numpy()
        yt = torch.as_tensor(np.asarray(y_train, dtype=np.float64)).reshape(len(y_train), -1)
        yh = torch.as_tensor(np.asarray(y_held, dtype=np.float64)).reshape(len(y_held), -1)
        mean, inv_std = column_stats(yt)
        return ((yh - mean) * inv_std).numpy()

    def _finish(self, lambdas, coefs, best, groups, n_layers) -> None:
        self.lambdas_ = np.asarray(lambdas)
        self.path_norms_ = np.stack([_block_norms(w, groups) for w, _ in coefs])
        self.best_index_ = best
        self.lambda_ = float(lambdas[best])
        self.coef_, self.intercept_ = coefs[best]
        self.block_norms_ = self.path_norms_[best]
        order = np.argsort(-self.block_norms_, kind="stable")
        self.selected_layers_ = [int(i) for i in order if self.block_norms_[i] > 0]
        self.n_layers_in_ = n_layers


def _block_norms(w: np.ndarray, groups: Sequence[tuple[int, int]]) -> np.ndarray:
    return np.array([np.linalg.norm(w[a:b]) for a, b in groups])


def _block_soft_threshold(
    w: np.ndarray, tau: float, group_id: np.ndarray, n_groups: int
) -> np.ndarray:
    """Proximal map of ``tau · Σ_g ‖W_g‖_F``: shrink each block's norm by tau (to 0 if below)."""
    norms = np.sqrt(np.bincount(group_id, weights=(w * w).sum(1), minlength=n_groups))
    factor = np.where(norms > tau, 1.0 - tau / np.where(norms > 0, norms, 1.0), 0.0)
    return w * factor[group_id][:, None]
