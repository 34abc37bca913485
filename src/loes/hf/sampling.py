"""Calibration sampling that cannot silently go wrong.

The published code takes the first N rows of a split; on a label-sorted split
that is a single class. Here the sample is a seeded draw, stratified by class
for classification, and a missing class is reported with a warning.
"""

from __future__ import annotations

import heapq
import warnings
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import numpy as np

from loes._exceptions import LOESError, LOESWarning
from loes._rng import RandomState, check_random_state
from loes._splits import allocate

__all__ = ["DEFAULT_MAX_SAMPLES", "calibration_indices", "stratified_reservoir"]

#: Default cap on calibration samples: enough for stable ridge fits at widths
#: up to ~1k, small enough to extract in minutes on a CPU.
DEFAULT_MAX_SAMPLES = 1024


def _label_keys(labels: np.ndarray) -> np.ndarray:
    """One hashable, sortable key per row (rows of a 2-D label matrix become tuples)."""
    if labels.ndim == 1:
        return labels
    flat = labels.reshape(len(labels), -1)
    return np.array([hash(row.tobytes()) for row in flat])


def calibration_indices(
    n_rows: int,
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
    labels: Any = None,
    *,
    stratify: bool = True,
    all_classes: Sequence[Any] | None = None,
    random_state: RandomState = 0,
) -> np.ndarray:
    """Row indices of a calibration sample, sorted ascending.

    Parameters
    ----------
    n_rows : int
        Number of rows available.
    max_samples : int, optional
        Sample size cap; ``None`` (or a cap >= ``n_rows``) keeps every row.
    labels : array of shape (n_rows,), optional
        Class labels (any values). With ``stratify=True`` each class gets a share
        proportional to its frequency (largest remainder), and at least one row
        while the budget allows.
    all_classes : sequence, optional
        Every class the task has (e.g. a ``ClassLabel``'s ids); a class absent
        from the sample is reported with a :class:`~loes.LOESWarning`.
    random_state : None, int, numpy Generator/RandomState or torch.Generator
        See :func:`loes._rng.check_random_state`; the global RNG is never touched.

    Returns
    -------
    ndarray of int64, shape (n_samples,)

    Examples
    --------
    >>> y = np.repeat([0, 1, 2], [50, 30, 20])   # a label-sorted split
    >>> idx = calibration_indices(100, 10, y, random_state=0)
    >>> np.bincount(y[idx]).tolist()
    [5, 3, 2]
    """
    if n_rows <= 0:
        raise LOESError("the dataset has no rows to sample calibration data from")
    if max_samples is not None and (isinstance(max_samples, bool) or int(max_samples) < 1):
        raise LOESError(
            f"max_calibration_samples must be a positive integer or None; got {max_samples!r}"
        )
    rng = check_random_state(random_state)
    take_all = max_samples is None or int(max_samples) >= n_rows
    keys = None
    if labels is not None:
        lab = np.asarray(labels)
        if len(lab) != n_rows:
            raise LOESError(f"labels has {len(lab)} rows for a dataset of {n_rows} rows")
        keys = _label_keys(lab)
    if take_all:
        idx = np.arange(n_rows, dtype=np.int64)
    elif keys is None or not stratify:
        idx = np.sort(rng.choice(n_rows, size=int(max_samples), replace=False)).astype(np.int64)
    else:
        idx = _stratified(keys, int(max_samples), rng)
    if keys is not None:
        _warn_missing(keys, idx, all_classes, labels)
    return idx


def _stratified(keys: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Each class's quota by :func:`loes._splits.allocate` (capped by its size), drawn with ``rng``."""
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    quota = allocate(budget, counts, capacity=counts)
    chosen = [
        rng.choice(np.flatnonzero(inverse == c), size=int(q), replace=False)
        for c, q in enumerate(quota)
        if q
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _warn_missing(keys: np.ndarray, idx: np.ndarray, all_classes, labels) -> None:
    sampled = set(np.unique(keys[idx]).tolist())
    in_split = set(np.unique(keys).tolist())
    expected = (
        set(all_classes) if all_classes is not None and np.asarray(labels).ndim == 1 else in_split
    )
    absent_split = sorted(expected - in_split, key=str)
    if absent_split:
        warnings.warn(
            f"classes {absent_split} have no rows in this split: the calibration sample "
            "cannot represent them (use another split or check the labels)",
            LOESWarning,
            stacklevel=3,
        )
    missing = sorted((expected & in_split) - sampled, key=str)
    if missing:
        warnings.warn(
            f"classes {missing} are missing from the calibration sample of {len(idx)} rows: "
            "raise max_calibration_samples",
            LOESWarning,
            stacklevel=3,
        )
    if len(sampled) == 1:
        warnings.warn(
            f"the calibration sample holds a single class ({next(iter(sampled))!r}): "
            "class-based scores are meaningless; check the labels or the split",
            LOESWarning,
            stacklevel=3,
        )


def stratified_reservoir(
    rows: Iterable[Any],
    max_samples: int,
    class_of: Callable[[Any], Hashable] | None = None,
    *,
    random_state: RandomState = 0,
) -> tuple[np.ndarray, list[Any], dict[Hashable, int]]:
    """A seeded, class-stratified sample of a stream, drawn in one pass.

    Priority sampling: row ``i`` gets the key ``u_i`` (the ``i``-th uniform draw of
    ``random_state``), and each class keeps the ``max_samples`` rows with the
    smallest keys seen so far (a bounded heap). At the end the budget is split
    over the classes by their counts in the whole stream with the rule of
    :func:`calibration_indices` (proportional, largest remainder, each class at
    least once while the budget allows), and each class gives its ``q`` smallest
    keys: a uniform random ``q``-subset of that class. The result depends on
    ``random_state`` and the stream's content and order only; memory is at most
    ``n_classes * max_samples`` rows.

    Parameters
    ----------
    rows : iterable
        Read once.
    max_samples : int >= 1
    class_of : callable, optional
        A row's class (hashable); ``None``: one class (a plain uniform reservoir).
    random_state : None, int, numpy Generator/RandomState or torch.Generator

    Returns
    -------
    positions : ndarray of int64, shape (n_samples,)
        Stream positions of the sampled rows, ascending.
    sample : list
        The sampled rows, in that order.
    counts : dict
        Rows per class in the whole stream.

    Examples
    --------
    >>> stream = ((i, i % 10 < 7) for i in range(1000))
    >>> pos, rows, counts = stratified_reservoir(stream, 100, lambda r: r[1])
    >>> sum(r[1] for r in rows), counts[True]
    (70, 700)
    """
    rng = check_random_state(random_state)
    heaps: dict[Hashable, list[tuple[float, int, Any]]] = {}
    counts: dict[Hashable, int] = {}
    draws = np.empty(0)
    for i, row in enumerate(rows):
        if i % 4096 == 0:
            draws = rng.random(4096)
        c = None if class_of is None else class_of(row)
        counts[c] = counts.get(c, 0) + 1
        item = (-float(draws[i % 4096]), i, row)  # max-heap of the smallest keys
        heap = heaps.setdefault(c, [])
        if len(heap) < max_samples:
            heapq.heappush(heap, item)
        elif item[0] > heap[0][0]:
            heapq.heapreplace(heap, item)
    classes = sorted(counts, key=repr)
    quota = (
        allocate(
            max_samples,
            np.array([counts[c] for c in classes]),
            capacity=np.array([counts[c] for c in classes]),
        )
        if classes
        else []
    )
    chosen = [
        (i, row)
        for c, q in zip(classes, quota)
        for _, i, row in sorted(heaps[c], key=lambda t: -t[0])[: int(q)]
    ]
    chosen.sort(key=lambda t: t[0])
    return np.array([i for i, _ in chosen], dtype=np.int64), [row for _, row in chosen], counts
