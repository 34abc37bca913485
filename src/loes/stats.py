"""Streaming statistics: float64 moments of features (and targets), merged exactly.

What is additive over rows is accumulated batch by batch, so a data set far
larger than memory can be read shard by shard and the shards' statistics merged
across processes or machines:

- :class:`Moments`: one layer's row count ``n``, mean ``x̄`` (D,), centred
  second moment ``M2 = Σ (x − x̄)(x − x̄)ᵀ`` (D, D) and, with targets, their
  mean ``ȳ`` (t,), per-column sum of squares ``Σ (y − ȳ)²`` (t,) and the
  cross-moment ``C = Σ (x − x̄)(y − ȳ)ᵀ`` (D, t);
- :class:`LayerMoments`: one :class:`Moments` per layer, shared targets;
- :class:`MomentRidge`: ridge regression with an intercept and its GCV
  criterion from a :class:`Moments`, without the rows.

Each batch is centred at its own mean in float64, then folded in with the
parallel formula of Chan, Golub and LeVeque (1979): for parts a and b with
``δ = x̄_b − x̄_a`` and ``n = n_a + n_b``,

``x̄ = x̄_a + δ·n_b/n``,  ``M2 = M2_a + M2_b + δδᵀ·n_a·n_b/n``

(and the same for ``C`` with ``δ_x δ_yᵀ``). It is exact in exact arithmetic,
so any order and grouping of the batches gives the same result up to
rounding, and it never forms the raw sum of squares ``Σ xxᵀ − n x̄x̄ᵀ``, which
loses every digit for features far from zero (a mean of 10⁶ with a spread
of 1). Means are kept as a shift (the first batch's mean) plus the mean of
the shifted rows, so ``δ`` is a difference of small numbers: the merged
moments match a two-pass in-memory computation to about 1e-15 even then. Memory is ``D²`` float64 per layer (134 MB at D = 4096), whatever the
number of rows.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from loes._exceptions import LOESError
from loes._linalg import relative_penalty, sym_gram
from loes._validation import _as_tensor, _is_array, normalize_task

__all__ = ["LayerMoments", "MomentRidge", "Moments", "as_rows", "split_layers", "split_xy"]

#: Largest absolute feature value accepted: the squares of n such values stay finite.
_MAX_ABS = 1e100

#: The arrays of a Moments' state (None before the first batch, or without targets).
_STATE = ("shift", "mean_shifted", "m2", "y_shift", "y_mean_shifted", "y_ss", "cross")


def _centre(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """``(shift, mean of x − shift, x − mean)`` with ``shift`` the computed column mean.

    The second pass recovers what the first one rounded away (``mean_shifted``
    is of the order of rounding), so ``shift + mean_shifted`` is the mean to
    about one ulp and the centred rows sum to zero to the same accuracy.
    """
    shift = x.mean(0)
    xs = x - shift
    mean_shifted = xs.mean(0)
    return shift.cpu().numpy(), mean_shifted.cpu().numpy(), xs - mean_shifted


def as_rows(x: Any, what: str = "x", dim: int | None = None) -> torch.Tensor:
    """One validated batch of rows as a tensor view (no copy; dtype and device kept).

    Errors (:class:`~loes.LOESError`) for anything but a non-empty real (n, D)
    array, for ``D != dim`` when ``dim`` is given, for NaN/Inf and for entries
    whose squares would overflow float64.
    """
    t = _as_tensor(x, what)
    if t.ndim != 2:
        raise LOESError(f"{what} must have shape (n, dim); got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise LOESError(f"{what} is an empty batch (0 rows): skip empty batches")
    if dim is not None and t.shape[1] != dim:
        raise LOESError(
            f"{what} has {t.shape[1]} features but earlier batches had {dim}: every "
            "batch of a layer must carry the same features"
        )
    if t.shape[1] == 0:
        raise LOESError(f"{what} has 0 features")
    if t.is_floating_point():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise LOESError(
                f"{what} contains {bad} NaN/Inf values: drop or fix those rows "
                "(fp16 overflow? extract in fp32 or bf16)"
            )
    big = float(t.abs().max()) if t.dtype != torch.bool else 1.0
    if big > _MAX_ABS:
        raise LOESError(
            f"{what} has entries as large as {big:.3g}: their squares overflow float64; "
            "rescale the features"
        )
    return t


def split_layers(x: Any) -> list[Any]:
    """One batch of features as a list of per-layer (n, D_l) arrays or tensors (views).

    Parameters
    ----------
    x : array or tensor of shape (n, n_layers, dim), or a list of n_layers
        arrays of shape (n, dim_l)
    """
    if isinstance(x, (list, tuple)):
        if not x or not all(map(_is_array, x)):
            raise LOESError(
                "a batch given as a list must hold one (n, dim_l) array per layer; "
                f"got {type(x).__name__} of {len(x)} item(s)"
            )
        return list(x)
    if not _is_array(x):
        raise LOESError(
            "a batch of features must be an array or tensor of shape (n, n_layers, dim) or a list "
            f"of (n, dim_l) arrays; got {type(x).__name__}"
        )
    ndim = getattr(x, "ndim", np.ndim(x))
    if ndim != 3:
        hint = ": for a single layer use x[:, None, :]" if ndim == 2 else ""
        raise LOESError(
            "a batch of features must have shape (n, n_layers, dim); "
            f"got shape {tuple(np.shape(x))}{hint}"
        )
    return [x[:, i, :] for i in range(x.shape[1])]


def split_xy(item: Any) -> tuple[Any, Any]:
    """``(x, y)`` from one stream item: an ``(x, y)`` pair or the features ``x`` alone.

    A tuple or list of two whose first element is a 3-D array or a list of
    layers is an ``(x, y)`` pair (``y`` may be None); anything else is ``x``
    with ``y = None`` (a list of 2-D arrays is a list of layers).
    """
    if isinstance(item, (tuple, list)) and len(item) == 2:
        first = item[0]
        if isinstance(first, (list, tuple)) or getattr(first, "ndim", None) == 3:
            return item[0], item[1]
    return item, None


def _check_classes(classes: Any) -> list:
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Iterable):
        raise LOESError(f"classes must be a list of the class labels (at least 2); got {classes!r}")
    out = [c.item() if isinstance(c, np.generic) else c for c in classes]
    try:
        unique = len(set(out)) == len(out)
    except TypeError as e:
        raise LOESError(f"classes must be hashable labels (ints, strings, ...); {e}") from e
    if len(out) < 2 or not unique:
        raise LOESError(
            f"classes must list at least 2 distinct labels, each once; got {out[:20]!r}"
        )
    return out


def _resolve_task(task: str | None, classes: Any) -> tuple[str, list | None]:
    if classes is not None:
        if task is not None and normalize_task(task) != "classification":
            raise LOESError(f"classes are given, so task must be 'classification'; got {task!r}")
        return "classification", _check_classes(classes)
    task = normalize_task(task) if task is not None else "label_free"
    if task == "classification":
        raise LOESError(
            "streaming classification needs the class list up front so that shards merge: "
            "pass classes=[...] (every label that can occur)"
        )
    return task, None


class Moments:
    """Running float64 moments of one layer's features, and optionally of targets.

    Parameters
    ----------
    task : {"regression", "classification", "label_free"}, optional
        Default: "classification" when ``classes`` is given, else "label_free"
        (features only; :meth:`update` then takes no targets).
    classes : sequence of labels, optional
        The fixed class list: each label is one-hot encoded over it, in this
        order, so every shard encodes alike and shards merge. A label outside
        the list is an error.

    Attributes
    ----------
    n : int
        Rows seen.
    mean : ndarray of shape (D,) or None
        ``x̄`` (None before the first batch): ``shift + mean_shifted``.
    shift, mean_shifted : ndarray of shape (D,) or None
        The stored form of the mean: a reference point (the first batch's
        mean) and the mean of ``x − shift``.
    m2 : ndarray of shape (D, D) or None
        ``M2 = Σ (x − x̄)(x − x̄)ᵀ``, i.e. ``XcᵀXc``.
    y_mean : ndarray of shape (t,) or None
        ``ȳ`` (one-hot columns for classification: the class frequencies),
        stored as ``y_shift + y_mean_shifted``.
    y_ss : ndarray of shape (t,) or None
        ``Σ (y − ȳ)²`` per target column.
    cross : ndarray of shape (D, t) or None
        ``C = Σ (x − x̄)(y − ȳ)ᵀ``, i.e. ``XcᵀYc``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(1e6, 1.0, size=(1000, 3))
    >>> a = Moments().update(x[:300])
    >>> b = Moments().update(x[300:700]).update(x[700:])
    >>> m = a + b
    >>> m.n, bool(np.allclose(m.covariance(), np.cov(x.T), rtol=1e-10, atol=0))
    (1000, True)
    """

    def __init__(self, *, task: str | None = None, classes: Sequence[Any] | None = None):
        self.task, self.classes = _resolve_task(task, classes)
        self.n = 0
        for name in _STATE:
            setattr(self, name, None)

    @property
    def mean(self) -> np.ndarray | None:
        """``x̄`` (D,)."""
        return None if self.shift is None else self.shift + self.mean_shifted

    @property
    def y_mean(self) -> np.ndarray | None:
        """``ȳ`` (t,)."""
        return None if self.y_shift is None else self.y_shift + self.y_mean_shifted

    # ------------------------------------------------------------ properties
    @property
    def dim(self) -> int | None:
        """D, the number of features (None before the first batch)."""
        return None if self.shift is None else int(self.shift.shape[0])

    @property
    def n_targets(self) -> int | None:
        """t, the number of target columns (None without targets or before the first batch)."""
        return None if self.y_shift is None else int(self.y_shift.shape[0])

    def __repr__(self) -> str:
        return (
            f"Moments(task={self.task!r}, n={self.n}, dim={self.dim}, n_targets={self.n_targets})"
        )

    # ---------------------------------------------------------------- update
    def update(self, x: Any, y: Any = None) -> Moments:
        """Fold in one batch of rows; returns ``self``.

        Parameters
        ----------
        x : array or tensor of shape (n, D)
            Any real dtype (fp16/bf16 included) and device; computed in float64.
        y : array of shape (n,) or (n, t), optional
            Class labels (classification) or real values (regression); required
            exactly when the moments hold targets.

        Nothing changes when the batch is rejected (empty, another width,
        NaN/Inf, labels outside the class list).
        """
        xt = self._check_x(x, "x")
        yt = self.encode_targets(y, xt.shape[0])
        self._merge(self._batch(xt, yt))
        return self

    def _check_x(self, x: Any, what: str) -> torch.Tensor:
        return as_rows(x, what, self.dim)

    def encode_targets(self, y: Any, n: int) -> torch.Tensor | None:
        """Validated float64 targets (n, t): one-hot over :attr:`classes`, or the values.

        Returns None for label-free moments (which take no targets).
        """
        if self.task == "label_free":
            if y is not None:
                raise LOESError(
                    "these moments were built without targets (task='label_free'); got targets: "
                    "build them with classes=[...] or task='regression' to accumulate targets"
                )
            return None
        if y is None:
            raise LOESError(
                f"these moments accumulate {self.task} targets: every batch needs y, update(x, y)"
            )
        if isinstance(y, torch.Tensor):
            y = _as_tensor(y, "y").cpu()
            y = (y.double() if y.is_floating_point() else y).numpy()
        arr = np.asarray(y)
        if arr.ndim == 0 or arr.shape[0] != n:
            raise LOESError(f"y must have one row per row of x ({n}); got shape {arr.shape}")
        if self.task == "regression":
            if arr.ndim > 2 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
                raise LOESError(
                    f"regression targets must be real numbers of shape (n,) or (n, t); got dtype "
                    f"{arr.dtype}, shape {arr.shape}"
                )
            if np.iscomplexobj(arr):
                raise LOESError(f"regression targets are complex ({arr.dtype}); pass real values")
            out = np.asarray(arr, dtype=np.float64).reshape(n, -1)
            if not np.isfinite(out).all():
                raise LOESError("regression targets contain NaN/Inf: drop those rows")
            if self.n_targets is not None and out.shape[1] != self.n_targets:
                raise LOESError(
                    f"y has {out.shape[1]} target columns but earlier batches had {self.n_targets}"
                )
            return torch.from_numpy(out)
        if arr.ndim != 1:
            raise LOESError(
                f"classification targets must be class labels of shape (n,); got shape {arr.shape}"
            )
        try:
            values, inverse = np.unique(arr, return_inverse=True)
        except TypeError as e:
            raise LOESError(f"class labels must be comparable values; {e}") from e
        index = {c: i for i, c in enumerate(self.classes)}
        keys = [v.item() if isinstance(v, np.generic) else v for v in values]
        unknown = [k for k in keys if k not in index]
        if unknown:
            raise LOESError(
                f"label(s) {unknown[:10]!r} are not in the class list {self.classes[:20]!r} "
                "given at construction: list every label that can occur in classes=[...] (the "
                "list is fixed so that shards merge), or drop those rows"
            )
        codes = np.array([index[k] for k in keys], dtype=np.int64)[inverse.reshape(-1)]
        return torch.nn.functional.one_hot(torch.from_numpy(codes), len(self.classes)).double()

    def _empty_like(self) -> Moments:
        out = copy.copy(self)
        out.n = 0
        for name in _STATE:
            setattr(out, name, None)
        return out

    def _batch(self, x: torch.Tensor, y: torch.Tensor | None) -> Moments:
        """The moments of one validated batch (a new object; ``self`` is untouched)."""
        out = self._empty_like()
        out.n = x.shape[0]
        out.shift, out.mean_shifted, xc = _centre(x.to(torch.float64))
        out.m2 = sym_gram(xc).cpu().numpy()
        if y is not None:
            out.y_shift, out.y_mean_shifted, yc = _centre(y.to(x.device))
            out.y_ss = (yc * yc).sum(0).cpu().numpy()
            out.cross = (xc.T @ yc).cpu().numpy()
        return out

    # ----------------------------------------------------------------- merge
    def merge(self, other: Moments) -> Moments:
        """Fold in another :class:`Moments` (Chan et al.'s parallel formula); returns ``self``."""
        self._check_compatible(other)
        self._merge(other)
        return self

    def __add__(self, other: Moments) -> Moments:
        if not isinstance(other, Moments):
            return NotImplemented
        self._check_compatible(other)
        return self.copy()._merge(other)

    def copy(self) -> Moments:
        """An independent copy."""
        return copy.deepcopy(self)

    def _check_compatible(self, other: Any) -> None:
        if not isinstance(other, Moments):
            raise LOESError(f"can only merge Moments with Moments; got {type(other).__name__}")
        if (self.task, self.classes) != (other.task, other.classes):
            raise LOESError(
                f"cannot merge moments of task={other.task!r}, classes={other.classes!r} into "
                f"task={self.task!r}, classes={self.classes!r}: build every shard's moments "
                "with the same task and the same class list"
            )
        for what, mine, theirs in (
            ("features", self.dim, other.dim),
            ("target columns", self.n_targets, other.n_targets),
        ):
            if mine is not None and theirs is not None and mine != theirs:
                raise LOESError(
                    f"cannot merge moments with {theirs} {what} into moments with {mine}: "
                    "the shards hold different data"
                )

    def _merge(self, o: Moments) -> Moments:
        """Chan et al.'s update (no checks; ``o`` is not changed)."""
        if o.n == 0:
            return self
        if self.n == 0:
            for name in _STATE:
                value = getattr(o, name)
                setattr(self, name, None if value is None else value.copy())
            self.n = o.n
            return self
        n = self.n + o.n
        f = self.n * o.n / n
        # δ from the shifts' difference (exact for nearby shifts) plus small numbers
        dx = (o.shift - self.shift) + (o.mean_shifted - self.mean_shifted)
        self.m2 += o.m2
        self.m2 += f * np.outer(dx, dx)
        self.mean_shifted = self.mean_shifted + dx * (o.n / n)
        if self.y_shift is not None:
            dy = (o.y_shift - self.y_shift) + (o.y_mean_shifted - self.y_mean_shifted)
            self.y_ss = self.y_ss + o.y_ss + f * dy * dy
            self.cross = self.cross + o.cross + f * np.outer(dx, dy)
            self.y_mean_shifted = self.y_mean_shifted + dy * (o.n / n)
        self.n = n
        return self

    # ------------------------------------------------------------ quantities
    def _need(self, n: int = 1, targets: bool = False) -> None:
        if self.n < n:
            raise LOESError(f"these moments hold {self.n} rows; this needs at least {n}")
        if targets and self.y_shift is None:
            raise LOESError("these moments hold no targets (task='label_free')")

    def covariance(self, ddof: int = 1) -> np.ndarray:
        """Feature covariance ``M2 / (n − ddof)``, shape (D, D)."""
        self._need(int(ddof) + 1)
        return self.m2 / (self.n - ddof)

    def cross_covariance(self, ddof: int = 1) -> np.ndarray:
        """Feature-target covariance ``C / (n − ddof)``, shape (D, t)."""
        self._need(int(ddof) + 1, targets=True)
        return self.cross / (self.n - ddof)

    def xtx(self, centered: bool = True) -> np.ndarray:
        """``XcᵀXc = M2`` (centred), or the raw ``XᵀX = M2 + n x̄x̄ᵀ``, shape (D, D)."""
        self._need()
        return self.m2.copy() if centered else self.m2 + self.n * np.outer(self.mean, self.mean)

    def residual_ss(self, w: np.ndarray, b: np.ndarray) -> float:
        """``Σ ‖y − (xw + b)‖²`` over the rows, from the moments alone.

        With ``d = ȳ − x̄w − b`` the cross terms vanish (centred sums are 0):
        ``Σ_j ss_j − 2 tr(wᵀC) + tr(wᵀ M2 w) + n ‖d‖²``.

        Parameters
        ----------
        w : ndarray of shape (D, t)
        b : ndarray of shape (t,)
        """
        self._need(targets=True)
        w = np.asarray(w, dtype=np.float64).reshape(self.dim, -1)
        d = self.y_mean - self.mean @ w - np.asarray(b, dtype=np.float64).reshape(-1)
        sse = (
            self.y_ss.sum()
            - 2.0 * np.sum(w * self.cross)
            + np.sum(w * (self.m2 @ w))
            + self.n * float(d @ d)
        )
        return max(float(sse), 0.0)

    def affine(self, scale: Any, offset: Any = None) -> Moments:
        """The moments of ``(x − offset) · scale`` (per feature), exactly; targets unchanged.

        ``M2 → diag(s) M2 diag(s)``, ``C → diag(s) C``, ``x̄ → (x̄ − offset)·s``: a
        standardisation fitted from these moments, applied without the rows.

        Parameters
        ----------
        scale : array of shape (D,)
        offset : array of shape (D,), optional (default 0)
        """
        self._need()
        s = np.asarray(scale, dtype=np.float64).reshape(-1)
        o = np.zeros_like(s) if offset is None else np.asarray(offset, dtype=np.float64)
        if s.shape != (self.dim,) or o.shape != (self.dim,):
            raise LOESError(f"scale and offset must have shape ({self.dim},); got {s.shape}")
        out = self.copy()
        out.shift = (self.shift - o) * s
        out.mean_shifted = self.mean_shifted * s
        out.m2 = self.m2 * np.outer(s, s)
        if self.cross is not None:
            out.cross = self.cross * s[:, None]
        return out

    # ----------------------------------------------------------------- state
    def to_dict(self) -> dict[str, Any]:
        """The state as plain Python values and numpy arrays (picklable; :meth:`from_dict`)."""
        return {
            "task": self.task,
            "classes": None if self.classes is None else list(self.classes),
            "n": self.n,
            **{k: None if getattr(self, k) is None else getattr(self, k).copy() for k in _STATE},
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Moments:
        """Rebuild :class:`Moments` from :meth:`to_dict`'s output (arrays copied)."""
        out = cls(task=state["task"], classes=state["classes"])
        out.n = int(state["n"])
        for k in _STATE:
            value = state.get(k)
            setattr(out, k, None if value is None else np.array(value, dtype=np.float64))
        return out


class LayerMoments:
    """One :class:`Moments` per layer, updated from batches of all layers with shared targets.

    Parameters
    ----------
    task, classes
        As for :class:`Moments`.
    layers : sequence of int, optional
        Which layers of each batch to keep (indices into the batch's layers);
        default all. Memory is ``Σ D_l²`` float64 over the kept layers.

    Attributes
    ----------
    moments : list of Moments
        One per kept layer (empty before the first batch).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x, y = rng.normal(size=(90, 4, 6)), rng.integers(0, 3, 90)
    >>> shards = [LayerMoments(classes=[0, 1, 2]).update(x[i::3], y[i::3]) for i in range(3)]
    >>> total = shards[0] + shards[1] + shards[2]
    >>> len(total), total.n, bool(np.allclose(total[2].mean, x[:, 2].mean(0)))
    (4, 90, True)
    """

    def __init__(
        self,
        *,
        task: str | None = None,
        classes: Sequence[Any] | None = None,
        layers: Sequence[int] | None = None,
    ):
        self.task, self.classes = _resolve_task(task, classes)
        if layers is not None:
            layers = [int(i) for i in layers]
            if not layers or min(layers) < 0 or len(set(layers)) != len(layers):
                raise LOESError(
                    f"layers must be distinct non-negative layer indices; got {layers!r}"
                )
        self.layers = layers
        self.n_layers_in: int | None = None
        self.moments: list[Moments] = []

    def __len__(self) -> int:
        return len(self.moments)

    def __getitem__(self, i: int) -> Moments:
        return self.moments[i]

    def __iter__(self):
        return iter(self.moments)

    def __repr__(self) -> str:
        return (
            f"LayerMoments(task={self.task!r}, n={self.n}, n_layers={len(self)}, "
            f"widths={self.widths})"
        )

    @property
    def n(self) -> int:
        """Rows seen."""
        return self.moments[0].n if self.moments else 0

    @property
    def widths(self) -> list[int]:
        """D_l of each kept layer."""
        return [m.dim for m in self.moments]

    def update(self, x: Any, y: Any = None) -> LayerMoments:
        """Fold in one batch; returns ``self``.

        Parameters
        ----------
        x : array or tensor of shape (n, n_layers, dim), or a list of n_layers
            arrays of shape (n, dim_l)
        y : array of shape (n,) or (n, t), optional
            As for :meth:`Moments.update`.

        Every layer and the targets are validated before any layer changes.
        """
        layers = split_layers(x)
        if self.n_layers_in is not None and len(layers) != self.n_layers_in:
            raise LOESError(
                f"this batch has {len(layers)} layers but earlier batches had {self.n_layers_in}"
            )
        keep = self.layers if self.layers is not None else list(range(len(layers)))
        if max(keep) >= len(layers):
            raise LOESError(
                f"layers={self.layers} asks for layer {max(keep)} but the batch has "
                f"{len(layers)} layers"
            )
        moments = self.moments or [Moments(task=self.task, classes=self.classes) for _ in keep]
        checked = [m._check_x(layers[i], f"layer {i}") for m, i in zip(moments, keep)]
        rows = {t.shape[0] for t in checked}
        if len(rows) != 1:
            raise LOESError(f"all layers of a batch must have the same rows; got {sorted(rows)}")
        yt = moments[0].encode_targets(y, rows.pop())
        for m, t in zip(moments, checked):  # validated: cannot fail half-way
            m._merge(m._batch(t, yt))
        self.moments, self.n_layers_in = moments, len(layers)
        return self

    def consume(self, batches: Iterable[Any]) -> LayerMoments:
        """:meth:`update` with every item of ``batches`` (:func:`split_xy`); returns ``self``.

        Label-free moments ignore the targets of ``(x, y)`` items.
        """
        for item in batches:
            x, y = split_xy(item)
            self.update(x, None if self.task == "label_free" else y)
        return self

    def merge(self, other: LayerMoments) -> LayerMoments:
        """Fold in another :class:`LayerMoments` layer by layer; returns ``self``."""
        self._check_compatible(other)
        if not other.moments:
            return self
        if not self.moments:
            self.moments = [m.copy() for m in other.moments]
            self.n_layers_in = other.n_layers_in
            return self
        for mine, theirs in zip(self.moments, other.moments):
            mine._merge(theirs)
        return self

    def __add__(self, other: LayerMoments) -> LayerMoments:
        if not isinstance(other, LayerMoments):
            return NotImplemented
        self._check_compatible(other)
        return self.copy().merge(other)

    def copy(self) -> LayerMoments:
        """An independent copy."""
        return copy.deepcopy(self)

    def _check_compatible(self, other: Any) -> None:
        if not isinstance(other, LayerMoments):
            raise LOESError(
                f"can only merge LayerMoments with LayerMoments; got {type(other).__name__}"
            )
        if (self.task, self.classes, self.layers) != (other.task, other.classes, other.layers):
            raise LOESError(
                f"cannot merge layer moments of task={other.task!r}, classes={other.classes!r}, "
                f"layers={other.layers!r} into task={self.task!r}, classes={self.classes!r}, "
                f"layers={self.layers!r}: build every shard's moments with the same settings"
            )
        if self.moments and other.moments:
            if len(self) != len(other) or self.n_layers_in != other.n_layers_in:
                raise LOESError(
                    f"cannot merge moments of {len(other)} layers into moments of {len(self)}"
                )
            for i, (a, b) in enumerate(zip(self.moments, other.moments)):
                try:
                    a._check_compatible(b)
                except LOESError as e:
                    raise LOESError(f"layer {i}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The state as plain values and numpy arrays (picklable; :meth:`from_dict`)."""
        return {
            "task": self.task,
            "classes": None if self.classes is None else list(self.classes),
            "layers": self.layers,
            "n_layers_in": self.n_layers_in,
            "moments": [m.to_dict() for m in self.moments],
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> LayerMoments:
        """Rebuild :class:`LayerMoments` from :meth:`to_dict`'s output."""
        out = cls(task=state["task"], classes=state["classes"], layers=state["layers"])
        out.n_layers_in = state["n_layers_in"]
        out.moments = [Moments.from_dict(m) for m in state["moments"]]
        return out


class MomentRidge:
    """Ridge with an unpenalised intercept and its GCV criterion, from :class:`Moments`.

    The same quantities as :class:`loes._linalg.RidgePath` without the rows.
    With ``M2 = V diag(s²) Vᵀ`` (``s²``: the squared singular values of the
    centred features Xc, so ``VᵀC = diag(s) UᵀYc``) and a strength λ
    (:func:`loes._linalg.relative_penalty` of ``reg``, from ``tr M2``):

    - weights ``W = (M2 + λI)⁺ C = V diag(1/(s² + λ)) VᵀC``, intercept ``b = ȳ − x̄W``;
    - shrinkage ``f_k = s_k²/(s_k² + λ)``, ``tr H = 1 + Σ f_k`` (intercept counted);
    - in-sample residual sum of squares
      ``RSS = ‖Yc‖² − Σ_k (1 − (1 − f_k)²) ‖(VᵀC)_k‖² / s_k²``;
    - ``GCV = RSS / (1 − tr H / n)²`` (the sum of RidgePath's squared GCV residuals).

    Directions with ``s_k² <= max(s²)·max(n, D)·eps`` are dropped, as in RidgePath.

    Parameters
    ----------
    moments : Moments
        With targets, at least 2 rows.
    """

    def __init__(self, moments: Moments):
        moments._need(2, targets=True)
        self.moments = moments
        self.n, self.d = moments.n, moments.dim
        self.trace = float(np.trace(moments.m2))
        s2, v = np.linalg.eigh(moments.m2)
        keep = s2 > max(float(s2.max()), 0.0) * max(self.n, self.d) * np.finfo(np.float64).eps
        self.s2, self.v = s2[keep], v[:, keep]
        self.vtc = self.v.T @ moments.cross
        self.yss = float(moments.y_ss.sum())

    def penalty(self, reg: float) -> float:
        """The absolute λ for the relative strength ``reg``."""
        return relative_penalty(reg, self.trace, self.n, self.d)

    def coef(self, reg: float) -> tuple[np.ndarray, np.ndarray]:
        """Weights (D, t) and intercept (t,)."""
        w = self.v @ (self.vtc / (self.s2 + self.penalty(reg))[:, None])
        return w, self.moments.y_mean - self.moments.mean @ w

    def gcv(self, reg: float) -> float:
        """``RSS / (1 − tr H / n)²`` (inf when the denominator vanishes)."""
        f = self.s2 / (self.s2 + self.penalty(reg))
        explained = ((1.0 - (1.0 - f) ** 2) * (self.vtc**2).sum(1) / self.s2).sum()
        rss = max(self.yss - float(explained), 0.0)
        denom = 1.0 - (1.0 + float(f.sum())) / self.n
        return rss / denom**2 if denom > 0 else float("inf")
