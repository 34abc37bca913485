"""Seeded splits: one allocator, one stratified split, one fold maker.

- :func:`allocate`: an integer total shared out by weights (largest remainder,
  at least one per part while the total allows, optional caps).
- :func:`split_indices`: a seeded (stratified) split of ``range(n)`` into parts
  of given fractions; :func:`holdout_split` and :func:`kfold` are its two uses.

Randomness comes only from ``random_state`` through :func:`loes._rng.check_random_state`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from loes._exceptions import LOESError
from loes._rng import check_random_state

__all__ = ["allocate", "holdout_split", "kfold", "split_indices"]


def allocate(
    total: int, weights: Sequence[float], capacity: Sequence[int] | None = None
) -> np.ndarray:
    """Share ``total`` items among parts in proportion to ``weights`` (largest remainder).

    With shares ``q_p = total · w_p / Σw``: each part gets ``⌊q_p⌋``, at least 1
    when ``total >= len(weights)`` (every part represented), at most
    ``capacity[p]``; items still to hand out go one at a time to the part with
    room and the largest ``q_p − count_p`` (ties: the earlier part); an
    overshoot from the minimum of one is taken back from the part with the
    largest ``count_p − q_p`` among those holding more than one.

    Parameters
    ----------
    total : int
    weights : sequence of float, shape (n_parts,)
        Positive.
    capacity : sequence of int, optional
        Upper bound per part (``sum(capacity) >= total``).

    Returns
    -------
    ndarray of int64, shape (n_parts,), summing to ``total``

    Examples
    --------
    >>> allocate(10, [5, 3, 2]).tolist()
    [5, 3, 2]
    >>> allocate(10, [0.9, 0.05, 0.05]).tolist()
    [8, 1, 1]
    """
    w = np.asarray(weights, dtype=float)
    share = total * w / w.sum()
    count = np.floor(share).astype(np.int64)
    if total >= len(w):
        count = np.maximum(count, 1)
    cap = (
        np.full(len(w), np.iinfo(np.int64).max)
        if capacity is None
        else np.asarray(capacity, np.int64)
    )
    count = np.minimum(count, cap)
    while count.sum() < total:
        count[int(np.argmax(np.where(count < cap, share - count, -np.inf)))] += 1
    while count.sum() > total:
        count[int(np.argmax(np.where(count > 1, count - share, -np.inf)))] -= 1
    return count


def split_indices(
    n: int, fractions: Sequence[float], random_state: Any = 0, labels: Any = None
) -> list[np.ndarray]:
    """Seeded split of ``range(n)`` into parts of the given fractions.

    With ``labels`` the split is stratified: each class is shuffled and cut by
    :func:`allocate` in the same proportions, so every part keeps the class
    balance and every class with at least ``len(fractions)`` samples has a
    sample in every part.

    Parameters
    ----------
    n : int
    fractions : sequence of float
        Positive shares, normalised to sum to 1.
    random_state : None, int, numpy Generator/RandomState or torch.Generator
    labels : array of shape (n,), optional

    Returns
    -------
    list of int64 arrays, one per part, each sorted
    """
    fr = np.asarray(fractions, dtype=float)
    if fr.ndim != 1 or len(fr) == 0 or not (fr > 0).all() or not np.isfinite(fr).all():
        raise LOESError(f"fractions must be positive finite numbers; got {list(fractions)}")
    rng = check_random_state(random_state)
    if labels is None:
        groups = [np.arange(n)]
    else:
        lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        if lab.shape[0] != n:
            raise LOESError(f"labels must have {n} entries for stratification; got {lab.shape[0]}")
        _, inv = np.unique(lab, return_inverse=True)
        inv = inv.reshape(-1)
        groups = [np.flatnonzero(inv == c) for c in range(inv.max() + 1)]
    parts: list[list[int]] = [[] for _ in fr]
    for g in groups:
        g = rng.permutation(g)
        stops = np.cumsum(allocate(len(g), fr))
        for part, chunk in zip(parts, np.split(g, stops[:-1])):
            part.extend(chunk.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def holdout_split(
    n: int, frac: float, random_state: Any = 0, labels: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (stratified when labels are given) split of ``range(n)`` into (fit, held-out)
    with a share ``frac`` held out: :func:`split_indices` with ``(1 − frac, frac)``."""
    fit, held = split_indices(n, (1.0 - frac, frac), random_state, labels)
    return fit, held


def kfold(
    n: int, k: int, random_state: Any = 0, labels: Any = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` seeded (stratified when labels are given) folds: a list of (train, held-out).

    The held-out parts are :func:`split_indices` with ``k`` equal fractions; they
    are disjoint and cover ``range(n)``. An empty fold is a :class:`~loes.LOESError`.
    """
    held = split_indices(n, [1.0] * int(k), random_state, labels)
    if any(len(h) == 0 for h in held):
        raise LOESError(f"cv={k} leaves an empty fold with {n} samples; use fewer folds")
    every = np.arange(n)
    return [(np.setdiff1d(every, h), h) for h in held]
