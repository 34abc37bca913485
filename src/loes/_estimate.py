"""An honest estimate of what a layer choice is worth, from the calibration rows
(or held-out rows the caller passes).

The probe is the one every comparison uses: ridge regression with an
unpenalised intercept on the chosen layers, each layer z-scored and divided by
``sqrt(D_l)`` (:class:`~loes._linalg.LayerStandardizer`'s rule, so every layer
carries the same total variance) and concatenated. Classification regresses
one-hot targets and predicts the argmax (accuracy); regression reports R².

Scores are cross-validated without refitting. With the kernel
``K = Σ_l Z_l Z_lᵀ / D_l`` of the chosen layers, a constant feature of scale
``c`` for the intercept (``K + c·11ᵀ``, with ``c`` a thousand times the mean
diagonal, so the intercept's shrinkage is below 1e-3/N), and
``G = (K + c·11ᵀ + λI)⁻¹``, the residuals of a fold ``B`` held out from the fit
on all other rows are exactly ``e_B = (G_BB)⁻¹ (G Y)_B`` (the block form of the
leave-one-out identity). One float64 factorisation per layer set and strength
serves every fold of every repeat. λ is relative, ``reg · tr(K) / min(N − 1, ΣD_l)``,
with ``reg`` from :data:`ESTIMATE_REGS` by the least held-out squared error
(tried from the strongest down until one does worse).

Each layer's kernel ``Z_l Z_lᵀ / D_l`` is formed once, in the features' precision
(float32, or float64 for float64 input), and a layer set's kernel is the sum of its
layers' (the linear kernel of a concatenation), started from the previous set's sum
when that is a subset: the prefixes of ``k="auto"`` and last ⊂ last-k ⊂ all add one
kernel each.

The standard error of a mean over the ``n_splits × n_repeats`` fold scores is
their standard deviation over ``sqrt(n_splits)`` (repeats average away the
partition's noise, not the rows'). Comparisons are paired: the difference of two
layer sets is taken fold by fold on the same partitions, which cancels most of
the rows' noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from loes._exceptions import LOESError
from loes._linalg import column_stats, sym_gram
from loes._rng import check_random_state
from loes._splits import split_indices
from loes._validation import Targets

__all__ = [
    "CrossValidation",
    "Estimate",
    "calibration_cv",
    "choose_layers",
    "cv_estimate",
    "standard_sets",
]

#: Most calibration rows the estimate uses (a stratified sample beyond): its cost
#: grows as N³.
ESTIMATE_MAX_ROWS = 2000

#: Relative ridge strengths tried by the estimate's probe; the one with the least
#: held-out squared error is used for each layer set.
ESTIMATE_REGS = (1e-2, 1e-1, 1.0)


@dataclass
class Estimate:
    """Cross-validated probe scores of several layer sets on the same folds.

    Attributes
    ----------
    metric : {"accuracy", "r2"}
    layers : dict of name -> list of int
        Each compared layer set (``"selected"``, ``"last"``, ``"last_k"``, ``"all"``, ...).
    mean, se : dict of name -> float
        Mean fold score and its standard error.
    diff, diff_se : dict of name -> float
        Paired difference ``selected − name`` (positive: the selection is better)
        and its standard error.
    chance : float
        Accuracy of always predicting the majority class (0 for R²).
    n_samples, n_splits, n_repeats : int
    rows : {"calibration", "eval"}
        Which rows were cross-validated: the calibration rows the selection saw,
        or held-out rows the caller passed (``eval_embeddings=``/``eval_targets=``).
    """

    metric: str
    layers: dict[str, list[int]]
    mean: dict[str, float]
    se: dict[str, float]
    diff: dict[str, float] = field(default_factory=dict)
    diff_se: dict[str, float] = field(default_factory=dict)
    chance: float = 0.0
    n_samples: int = 0
    n_splits: int = 5
    n_repeats: int = 1
    rows: str = "calibration"

    def rows_used(self) -> str:
        """Which rows the scores come from, e.g. "the 300 held-out rows you passed, 5-fold CV x 3"."""
        which = "calibration rows" if self.rows == "calibration" else "held-out rows you passed"
        return f"the {self.n_samples} {which}, {self.n_splits}-fold CV x {self.n_repeats}"

    def _amount(self, value: float, signed: bool = True) -> str:
        if self.metric == "accuracy":
            return f"{100 * value:{'+' if signed else ''}.1f} points"
        return f"{value:{'+' if signed else ''}.3f} R²"

    def verdict(self, reference: str = "last") -> str:
        """One line: the selection's score against ``reference``, and whether the gap is real.

        The gap counts as real when it is more than twice its paired standard
        error. A selection within two standard errors of the majority-class rate
        (R² 0 for regression) is reported as carrying no signal.
        """
        sel = self.layers.get("selected")
        if sel is None or reference not in self.mean:
            raise LOESError(f"the estimate has no 'selected' or {reference!r} layer set")
        ref = _LABELS.get(reference, reference)
        floor, floor_name = (
            (self.chance, f"the majority class ({self.chance:.3f})")
            if self.metric == "accuracy"
            else (0.0, "predicting the mean (R² 0)")
        )
        if self.mean["selected"] - floor <= 2 * self.se["selected"]:
            return (
                f"layers {sel}: {self.mean['selected']:.3f} ± {self.se['selected']:.3f}: no better than "
                f"{floor_name} within two standard errors: at this sample size the probe's "
                f"{'accuracy' if self.metric == 'accuracy' else 'R²'} shows no clear signal"
            )
        head = (
            f"layers {sel}: {self.mean['selected']:.3f} ± {self.se['selected']:.3f} vs {ref} "
            f"{self.mean[reference]:.3f} ± {self.se[reference]:.3f}"
        )
        if self.layers[reference] == sel:
            return f"{head}: the pick is {ref}"
        d, s = self.diff[reference], self.diff_se[reference]
        gap = f"{self._amount(d)} ± {self._amount(s, signed=False)}"
        if abs(d) <= 2 * s:
            return f"{head}: {ref} is within noise of the pick ({gap})"
        return f"{head}: {gap} ({'better' if d > 0 else 'worse'} than {ref})"

    def table(self) -> str:
        """Every layer set's mean ± SE and its paired difference to the selection."""
        lines = [
            f"{'layers':<10} {'which':<28} {self.metric:>9} {'± SE':>7} {'sel − it':>9} {'± SE':>7}"
        ]
        for name, layers in self.layers.items():
            which = ", ".join(map(str, layers)) if len(layers) <= 6 else f"{len(layers)} layers"
            d = self.diff.get(name)
            lines.append(
                f"{name:<10} {which:<28} {self.mean[name]:>9.4f} {self.se[name]:>7.4f} "
                + (
                    f"{d:>+9.4f} {self.diff_se[name]:>7.4f}"
                    if d is not None
                    else f"{'':>9} {'':>7}"
                )
            )
        if self.metric == "accuracy":
            lines.append(f"majority class: {self.chance:.4f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "layers": self.layers,
            "mean": self.mean,
            "se": self.se,
            "diff": self.diff,
            "diff_se": self.diff_se,
            "chance": self.chance,
            "n_samples": self.n_samples,
            "n_splits": self.n_splits,
            "n_repeats": self.n_repeats,
            "rows": self.rows,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Estimate:
        def floats(m: Mapping[str, Any]) -> dict[str, float]:
            return {k: (math.nan if v is None else float(v)) for k, v in m.items()}

        return cls(
            metric=d["metric"],
            layers={k: list(v) for k, v in d["layers"].items()},
            mean=floats(d["mean"]),
            se=floats(d["se"]),
            diff=floats(d.get("diff", {})),
            diff_se=floats(d.get("diff_se", {})),
            chance=float(d.get("chance") or 0.0),
            n_samples=int(d.get("n_samples", 0)),
            n_splits=int(d.get("n_splits", 5)),
            n_repeats=int(d.get("n_repeats", 1)),
            rows=str(d.get("rows", "calibration")),
        )


_LABELS = {
    "last": "the last layer",
    "last_k": "the last-k concatenation",
    "all": "the all-layer concatenation",
}


def standard_sets(selected: Sequence[int], n_layers: int) -> dict[str, list[int]]:
    """The layer sets every estimate compares: the selection, the last layer,
    the last ``len(selected)`` layers and all layers."""
    k = len(selected)
    sets = {"selected": list(selected), "last": [n_layers - 1]}
    sets["last_k"] = list(range(n_layers - k, n_layers))
    sets["all"] = list(range(n_layers))
    return sets


def _standardized(layer: torch.Tensor) -> torch.Tensor:
    mean, inv_std = column_stats(layer)
    return (layer - mean) * (inv_std / math.sqrt(layer.shape[1]))


def _fold_residuals(
    kernel: torch.Tensor, y: torch.Tensor, folds: list[torch.Tensor], reg: float, dim: int
) -> list[torch.Tensor]:
    """Held-out residuals ``e_B = (G_BB)⁻¹ (G Y)_B`` of every fold at relative strength
    ``reg`` (the block leave-out identity; see the module docstring)."""
    n = kernel.shape[0]
    diag = torch.diagonal(kernel)
    scale = float(diag.mean()) or 1.0
    lam = max(reg * float(diag.sum()) / max(1, min(n - 1, dim)), 1e-10 * scale)
    a = kernel + 1e3 * scale
    a.diagonal().add_(lam)
    g = torch.cholesky_inverse(torch.linalg.cholesky(a))
    gy = g @ y
    # every G_BB (symmetric positive definite) padded with the identity to one size:
    # one batched Cholesky solve; numpy's np.ix_ gathers the blocks fastest
    size = max(len(idx) for idx in folds)
    blocks = torch.eye(size, dtype=g.dtype).repeat(len(folds), 1, 1)
    rhs = torch.zeros(len(folds), size, y.shape[1], dtype=g.dtype)
    g_np = g.numpy()
    for b, idx in enumerate(folds):
        blocks[b, : len(idx), : len(idx)] = torch.from_numpy(g_np[np.ix_(idx, idx)])
        rhs[b, : len(idx)] = gy[idx]
    e = torch.cholesky_solve(rhs, torch.linalg.cholesky(blocks))
    return [e[b, : len(idx)] for b, idx in enumerate(folds)]


def _fold_predictions(
    kernel: torch.Tensor,
    y: torch.Tensor,
    folds: list[torch.Tensor],
    regs: Sequence[float],
    dim: int,
) -> list[torch.Tensor]:
    """Held-out predictions of each fold at the strength in ``regs`` with the least
    held-out squared error.

    Strengths are tried from the strongest down, stopping at the first that does
    worse than the one before: exact when the held-out error is unimodal in the
    strength (as a ridge's is in practice), and one factorisation fewer whenever a
    stronger strength wins.
    """
    best, best_sse = None, math.inf
    for reg in sorted(regs, reverse=True):
        resid = _fold_residuals(kernel, y, folds, reg, dim)
        sse = float(sum((e * e).sum() for e in resid))
        if sse >= best_sse:
            break
        best_sse, best = sse, [y[idx] - e for idx, e in zip(folds, resid)]
    return best


def _score(pred: torch.Tensor, y: torch.Tensor, labels: torch.Tensor | None, metric: str) -> float:
    if metric == "accuracy":
        return float((pred.argmax(1) == labels).double().mean())
    sse = float(((y - pred) ** 2).sum())
    sst = float(((y - y.mean(0, keepdim=True)) ** 2).sum())
    return 1.0 - sse / sst if sst > 0 else 0.0


class CrossValidation:
    """Fold scores of any layer set on fixed partitions of the calibration rows.

    Each layer's kernel is formed once, each layer set's scores once (cached by
    the set), so comparing many sets (``k="auto"``) costs one ``N × N``
    factorisation per set and strength tried.

    Parameters
    ----------
    layers : sequence of n_layers tensors of shape (N, D_l)
    y : tensor of shape (N, m)
        One-hot (or soft) labels for classification, targets for regression.
    task : {"classification", "regression"}
    labels : tensor of shape (N,), optional
        Class ids (classification); ``argmax(y)`` when not given.
    n_splits, n_repeats : int
        Stratified ``n_splits``-fold partitions, ``n_repeats`` of them.
    regs : sequence of float
        Relative ridge strengths tried; each layer set uses the one with the
        least held-out squared error.
    random_state : None, int or generator
        Seeds the partitions (:func:`loes._rng.check_random_state`).
    rows : {"calibration", "eval"}
        Which rows these are (recorded in :attr:`Estimate.rows`).
    """

    def __init__(
        self,
        layers: Sequence[torch.Tensor],
        y: torch.Tensor,
        task: str,
        *,
        labels: torch.Tensor | None = None,
        n_splits: int = 5,
        n_repeats: int = 3,
        regs: Sequence[float] = ESTIMATE_REGS,
        random_state: Any = 0,
        rows: str = "calibration",
    ):
        if rows not in ("calibration", "eval"):
            raise LOESError(f"rows must be 'calibration' or 'eval'; got {rows!r}")
        if task not in ("classification", "regression"):
            raise LOESError(
                f"an estimate needs targets (classification or regression); got task={task!r}"
            )
        self.layers = layers
        n = layers[0].shape[0]
        self.y = y.reshape(n, -1).to("cpu", torch.float64)  # the estimate runs on the CPU
        self.metric = "accuracy" if task == "classification" else "r2"
        self.labels, self.chance = None, 0.0
        if self.metric == "accuracy":
            self.labels = (self.y.argmax(1) if labels is None else labels).to(self.y.device)
            counts = torch.bincount(self.labels)
            smallest = int(counts[counts > 0].min())
            if smallest < 2:
                raise LOESError("an estimate needs at least 2 rows of every class")
            n_splits = max(2, min(n_splits, smallest))
            self.chance = float(counts.max()) / n
        if n < 2 * n_splits:
            raise LOESError(f"an estimate needs at least {2 * n_splits} rows; got {n}")
        self.n, self.n_splits, self.n_repeats, self.regs = n, n_splits, n_repeats, tuple(regs)
        self.rows = rows
        base = check_random_state(random_state)
        strata = self.labels.cpu().numpy() if self.labels is not None else None
        self.folds = [
            torch.as_tensor(held)
            for _ in range(n_repeats)
            for held in split_indices(n, [1.0] * n_splits, int(base.integers(2**31)), strata)
        ]
        # kernels and their sums in the features' precision (at least float32), solves in float64
        self._dtype = (
            torch.float64 if any(x.dtype == torch.float64 for x in layers) else torch.float32
        )
        self._kernels: dict[int, torch.Tensor] = {}
        self._last_sum: tuple[tuple[int, ...], torch.Tensor] | None = None
        self._scores: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def _kernel(self, i: int) -> torch.Tensor:
        if i not in self._kernels:
            z = _standardized(self.layers[i].to("cpu", self._dtype))
            self._kernels[i] = sym_gram(z, rows=True)
        return self._kernels[i]

    def _set_kernel(self, key: tuple[int, ...]) -> torch.Tensor:
        """``Σ_l K_l`` over ``key`` (in float64), from the previous set's sum when that is a
        subset (the prefixes of ``k="auto"``; last ⊂ last-k ⊂ all)."""
        done: tuple[int, ...] = ()
        if self._last_sum is not None and set(self._last_sum[0]) <= set(key):
            done, total = self._last_sum[0], self._last_sum[1].clone()
        else:
            total = torch.zeros(self.n, self.n, dtype=self._dtype)
        for i in key:
            if i not in done:
                total += self._kernel(i)
        self._last_sum = (key, total)
        return total.to(torch.float64)

    def _fit(self, layer_set: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Fold scores and mean squared held-out errors of ``layer_set``, from one fit (cached)."""
        key = tuple(sorted(int(i) for i in layer_set))
        if key not in self._scores:
            kernel = self._set_kernel(key)
            dim = sum(self.layers[i].shape[1] for i in key)
            preds = _fold_predictions(kernel, self.y, self.folds, self.regs, dim)
            truth = [
                (self.y[h], None if self.labels is None else self.labels[h]) for h in self.folds
            ]
            self._scores[key] = (
                np.array([_score(p, y, lab, self.metric) for p, (y, lab) in zip(preds, truth)]),
                np.array([float(((y - p) ** 2).sum(1).mean()) for p, (y, _) in zip(preds, truth)]),
            )
        return self._scores[key]

    def fold_scores(self, layer_set: Sequence[int]) -> np.ndarray:
        """Accuracy or R² of the probe on ``layer_set`` in every fold, shape (n_splits · n_repeats,)."""
        return self._fit(layer_set)[0]

    def fold_errors(self, layer_set: Sequence[int]) -> np.ndarray:
        """Mean squared held-out error (of the one-hot targets for classification) in every fold."""
        return self._fit(layer_set)[1]

    def null_errors(self) -> np.ndarray:
        """Each fold's mean squared error of predicting it by the other rows' target mean."""
        out = []
        for h in self.folds:
            rest = torch.ones(self.n, dtype=torch.bool)
            rest[h] = False
            out.append(float(((self.y[h] - self.y[rest].mean(0)) ** 2).sum(1).mean()))
        return np.array(out)

    def mean_se(self, layer_set: Sequence[int]) -> tuple[float, float]:
        s = self.fold_scores(layer_set)
        return float(s.mean()), float(s.std(ddof=1) / math.sqrt(self.n_splits))

    def diff(self, a: Sequence[int], b: Sequence[int]) -> tuple[float, float]:
        """Paired difference ``score(a) − score(b)`` over the same folds, and its standard error."""
        d = self.fold_scores(a) - self.fold_scores(b)
        return float(d.mean()), float(d.std(ddof=1) / math.sqrt(self.n_splits))

    def estimate(self, sets: Mapping[str, Sequence[int]]) -> Estimate:
        """An :class:`Estimate` of every set in ``sets`` (paired against ``sets["selected"]``)."""
        est = Estimate(
            metric=self.metric,
            layers={k: [int(i) for i in v] for k, v in sets.items()},
            mean={},
            se={},
            chance=self.chance,
            n_samples=self.n,
            n_splits=self.n_splits,
            n_repeats=self.n_repeats,
            rows=self.rows,
        )
        for name, layer_set in sets.items():
            est.mean[name], est.se[name] = self.mean_se(layer_set)
            if name != "selected" and "selected" in sets:
                est.diff[name], est.diff_se[name] = self.diff(sets["selected"], layer_set)
        return est


def cv_estimate(
    layers: Sequence[torch.Tensor],
    y: torch.Tensor,
    task: str,
    sets: Mapping[str, Sequence[int]],
    **kwargs: Any,
) -> Estimate:
    """Cross-validated probe scores of each layer set in ``sets`` on the same folds.

    ``kwargs`` go to :class:`CrossValidation` (``labels``, ``n_splits``,
    ``n_repeats``, ``regs``, ``random_state``). ``sets`` should contain
    ``"selected"`` for the paired differences.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> y = torch.arange(300) % 3
    >>> layers = [torch.randn(300, 8, generator=g) for _ in range(3)]
    >>> layers[1][:, :3] += 2 * torch.nn.functional.one_hot(y, 3)
    >>> est = cv_estimate(layers, torch.nn.functional.one_hot(y, 3).double(), "classification",
    ...                   {"selected": [1], "last": [2]})
    >>> bool(est.mean["selected"] > est.mean["last"] + 0.3)
    True
    >>> est.verdict().endswith("(better than the last layer)")
    True
    """
    return CrossValidation(layers, y, task, **kwargs).estimate(sets)


#: :func:`choose_layers` stops scoring prefixes this many steps after the best one so far.
CHOICE_PATIENCE = 2
#: :func:`choose_layers` takes the largest set whose held-out squared error is within this
#: many paired standard errors of the best. Chosen on the quality benchmark
#: (docs/evaluation.md): the probe is usually trained on more rows than the calibration
#: folds, and there a layer too many costs it less than a layer too few.
CHOICE_TOLERANCE = 1.0
#: ... and whose error is below that of predicting the targets' mean by more than this
#: many paired standard errors (the set carries signal); when none does, the last layer.
CHOICE_SIGNAL = 1.0


def choose_layers(
    cv: CrossValidation, order: Sequence[int], last: int
) -> tuple[list[int], dict[str, Any]]:
    """The largest of {the last layer alone, the prefixes of ``order``} whose
    cross-validated squared error is within :data:`CHOICE_TOLERANCE` paired
    standard errors of the best and below the error of the targets' mean by more
    than :data:`CHOICE_SIGNAL` paired standard errors; the last layer when none is.

    The criterion is the probe's held-out squared error (of the one-hot targets
    for classification), smoother than accuracy on a few hundred rows. Prefixes
    are scored until :data:`CHOICE_PATIENCE` steps pass without a new best.
    Between the last layer and another single layer the last layer wins (the
    burden of proof is on the alternative). Returns the chosen layers (in
    ``order``'s order) and a record of every candidate's accuracy (R²) mean and
    SE, its squared error and the paired gap of that error to the best.
    """
    fold_stats = cv._fit
    null = cv.null_errors()

    order = [int(i) for i in order]
    sets: dict[str, list[int]] = {"last": [int(last)]}
    best_j, best_err = 0, math.inf
    for j in range(1, len(order) + 1):
        sets[f"prefix_{j}"] = order[:j]
        err = fold_stats(order[:j])[1].mean()
        if err < best_err:
            best_j, best_err = j, err
        elif j - best_j >= CHOICE_PATIENCE:
            break
    best = min(sets, key=lambda name: fold_stats(sets[name])[1].mean())
    rows, eligible = [], []
    for name, layer_set in sets.items():
        scores, err = fold_stats(layer_set)
        gap = err - fold_stats(sets[best])[1]
        gap_se = float(gap.std(ddof=1) / math.sqrt(cv.n_splits))
        rows.append(
            {
                "name": name,
                "layers": layer_set,
                "mean": float(scores.mean()),
                "se": float(scores.std(ddof=1) / math.sqrt(cv.n_splits)),
                "error": float(err.mean()),
                "error_above_best": float(gap.mean()),
                "error_above_best_se": gap_se,
            }
        )
        gain = null - err
        signal = gain.mean() > CHOICE_SIGNAL * gain.std(ddof=1) / math.sqrt(cv.n_splits)
        if gap.mean() <= CHOICE_TOLERANCE * gap_se and signal:
            eligible.append(name)
    chosen = max(eligible, key=lambda name: (len(sets[name]), name == "last"), default="last")
    record = {
        "rule": f"largest of {{last layer, prefixes}} whose held-out squared error is within "
        f"{CHOICE_TOLERANCE} paired SE of the best ({cv.n_splits}-fold CV x {cv.n_repeats})",
        "order": order,
        "candidates": rows,
        "best": best,
        "chosen": chosen,
    }
    return sets[chosen], record


def calibration_cv(
    layers: Sequence[torch.Tensor], tgt: Targets, task: str, seed: Any, rows: str = "calibration"
) -> CrossValidation:
    """The estimate's cross-validation on the calibration rows, or on the caller's
    held-out rows with ``rows="eval"`` (a stratified sample of
    :data:`ESTIMATE_MAX_ROWS` when there are more)."""
    n = layers[0].shape[0]
    labels = tgt.labels
    if n > ESTIMATE_MAX_ROWS:
        strata = None if labels is None else labels.cpu().numpy()
        kept = torch.as_tensor(
            split_indices(n, [ESTIMATE_MAX_ROWS, n - ESTIMATE_MAX_ROWS], seed, strata)[0]
        )
        layers = [layer[kept.to(layer.device)] for layer in layers]
        y = tgt.y[kept.to(tgt.y.device)]
        labels = None if labels is None else labels[kept.to(labels.device)]
    else:
        y = tgt.y
    return CrossValidation(
        [layer.cpu() for layer in layers],
        y.cpu(),
        task,
        labels=None if labels is None else labels.cpu(),
        random_state=seed,
        rows=rows,
    )
