"""One way to turn a ``random_state`` argument into a random generator.

scikit-learn's convention (``sklearn.utils.check_random_state``), with
numpy's new-style generators and torch's:

================================  ==========================================
``random_state``                  meaning
================================  ==========================================
``None``                          fresh, unseeded randomness (not repeatable)
``int`` (Python or numpy)         a seed: the same value gives the same draws
``numpy.random.Generator``        used as it is (its state advances)
``numpy.random.RandomState``      a seed is drawn from it (its state advances)
``torch.Generator``               a seed is drawn from it (its state advances)
================================  ==========================================

Anything else (``1.5``, ``"42"``, ``True``) is a :class:`~loes.LOESError`:
silently casting it would hide a mistake. The global RNGs of numpy, torch and
Python are never touched.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch

from loes._exceptions import LOESError

__all__ = ["RandomState", "check_random_state", "seed_of", "torch_generator"]

RandomState = (
    None | int | np.integer | np.random.Generator | np.random.RandomState | torch.Generator
)

_SEED_BOUND = 2**63 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(
        value, (bool, np.bool_)
    )


def _check_seed(value: Any) -> int:
    seed = int(value)
    if seed < 0:
        raise LOESError(f"random_state must be a non-negative integer seed; got {seed}")
    return seed


def check_random_state(random_state: Any) -> np.random.Generator:
    """A :class:`numpy.random.Generator` for ``random_state`` (see the module docstring).

    >>> int(check_random_state(7).integers(100)) == int(check_random_state(7).integers(100))
    True
    >>> g = np.random.default_rng(0)
    >>> check_random_state(g) is g
    True
    """
    if random_state is None:
        return np.random.default_rng()
    if isinstance(random_state, np.random.Generator):
        return random_state
    if _is_int(random_state):
        return np.random.default_rng(_check_seed(random_state))
    if isinstance(random_state, np.random.RandomState):
        return np.random.default_rng(int(random_state.randint(0, 2**31 - 1)))
    if isinstance(random_state, torch.Generator):
        seed = int(torch.randint(0, _SEED_BOUND, (1,), generator=random_state))
        return np.random.default_rng(seed)
    raise LOESError(
        f"random_state must be None, an int seed, a numpy Generator/RandomState or a torch.Generator; "
        f"got {type(random_state).__name__} {random_state!r}"
    )


def seed_of(random_state: Any) -> int:
    """An int seed: the seed itself for an int, else one drawn from the generator.

    Use where a library downstream takes only an int. ``None`` draws fresh entropy.

    >>> seed_of(np.int64(7))
    7
    """
    if _is_int(random_state):
        return _check_seed(random_state)
    return int(check_random_state(random_state).integers(0, _SEED_BOUND))


def torch_generator(random_state: Any, device: str | torch.device = "cpu") -> torch.Generator:
    """A :class:`torch.Generator` for ``random_state``.

    An int seeds it with ``manual_seed(seed)`` (so results match code that seeded
    torch directly); a ``torch.Generator`` is returned as it is; other kinds are
    turned into a seed with :func:`seed_of`.

    >>> a = torch.randn(2, generator=torch_generator(3))
    >>> bool(torch.equal(a, torch.randn(2, generator=torch_generator(3))))
    True
    """
    if isinstance(random_state, torch.Generator):
        return random_state
    return torch.Generator(device=device).manual_seed(seed_of(random_state))
