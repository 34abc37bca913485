"""Shared fixtures: seeds and planted layer data."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

from loes import LOESWarning


@pytest.fixture
def seed() -> int:
    return 1234


@pytest.fixture
def rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def _quiet_loes_warnings():
    # Degenerate-data warnings are tested explicitly where they matter.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LOESWarning)
        yield


def run_python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (no logging configured, nothing imported)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out


def planted(
    n: int,
    dim: int,
    *,
    n_classes: int = 4,
    informative=(5,),
    n_layers: int = 10,
    strength: float = 1.5,
    seed: int = 0,
    dead=(),
    duplicate_of=None,
    rescale=None,
    regression: bool = False,
):
    """Layers of noise with class (or regression) signal planted in ``informative``.

    Each informative layer carries the signal in a random low-dimensional
    subspace at its own strength (first strongest) plus isotropic noise. ``dead``
    layers are all zeros, ``duplicate_of`` maps a layer to a copy of another,
    ``rescale`` maps a layer to a scale factor.
    """
    g = np.random.default_rng(seed)
    if regression:
        z = g.normal(size=(n, 3))
        y = z @ np.array([1.0, -2.0, 0.5])
    else:
        y = np.arange(n) % n_classes
        g.shuffle(y)
        z = np.eye(n_classes)[y] - 1.0 / n_classes
    x = g.normal(size=(n, n_layers, dim))
    for rank, layer in enumerate(informative):
        basis = np.linalg.qr(g.normal(size=(dim, z.shape[1])))[0]
        x[:, layer] += (
            strength / (1 + 0.3 * rank) * np.sqrt(dim / z.shape[1]) * (z @ basis.T) / z.std()
        )
    for layer in dead:
        x[:, layer] = 0.0
    for layer, src in (duplicate_of or {}).items():
        x[:, layer] = x[:, src]
    for layer, c in (rescale or {}).items():
        x[:, layer] *= c
    return x.astype(np.float32), y
