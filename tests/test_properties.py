"""Property tests (hypothesis) of the selection engine's invariances and of its
contract "finite scores or a LOESError", over random shapes, dtypes and
degenerate layers."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import planted

from loes import LOESError, select_layers_from_custom_embeddings

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings
from hypothesis import strategies as st

FEW = settings(max_examples=25, deadline=None, derandomize=True)
N_LAYERS = 6


def select(x, y, k=2, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return select_layers_from_custom_embeddings(x, y, k=k, show_progress=False, **kw)


_DATA = {
    seed: planted(90, 12, informative=(3, 1), n_layers=N_LAYERS, seed=seed, strength=2.0)
    for seed in (0, 1)
}
_BASE = {seed: select(x.astype(np.float64), y) for seed, (x, y) in _DATA.items()}


def _data(seed):
    x, y = _DATA[seed]
    return x.astype(np.float64), y, _BASE[seed]


def _same_scores(a, b, rtol=1e-6):
    assert a.selected_layers == b.selected_layers
    for s, t in zip(a.steps, b.steps):
        np.testing.assert_allclose(s.terms["total"], t.terms["total"], rtol=rtol, atol=1e-9)


@FEW
@given(
    seed=st.sampled_from([0, 1]),
    layer=st.integers(0, N_LAYERS - 1),
    exponent=st.floats(-20, 20),
    cv=st.sampled_from(["gcv", "loo"]),
)
def test_selection_unchanged_by_the_scale_of_any_layer(seed, layer, exponent, cv):
    x, y, base = _data(seed)
    if cv != "gcv":
        base = select(x, y, cv=cv)
    scaled = x.copy()
    scaled[:, layer] *= 10.0**exponent
    _same_scores(base, select(scaled, y, cv=cv))


@FEW
@given(
    seed=st.sampled_from([0, 1]),
    layer=st.integers(0, N_LAYERS - 1),
    offset=st.floats(-1e6, 1e6),
    per_feature=st.booleans(),
)
def test_selection_unchanged_by_offsets(seed, layer, offset, per_feature):
    x, y, base = _data(seed)
    shifted = x.copy()
    shift = offset * (np.linspace(-1, 1, x.shape[2]) if per_feature else 1.0)
    shifted[:, layer] += shift
    _same_scores(base, select(shifted, y), rtol=1e-5)


@FEW
@given(seed=st.sampled_from([0, 1]), perm_seed=st.integers(0, 2**16))
def test_selection_unchanged_by_permuting_samples(seed, perm_seed):
    x, y, base = _data(seed)
    perm = np.random.default_rng(perm_seed).permutation(len(y))
    _same_scores(base, select(x[perm], y[perm]))


@FEW
@given(seed=st.sampled_from([0, 1]), perm=st.permutations(range(N_LAYERS)))
def test_permuting_layers_permutes_the_selection(seed, perm):
    x, y, base = _data(seed)
    other = select(x[:, list(perm)], y)
    new_of = {old: new for new, old in enumerate(perm)}
    assert other.selected_layers == [new_of[l] for l in base.selected_layers]
    np.testing.assert_allclose(other.layer_scores, base.layer_scores, rtol=1e-6, atol=1e-9)


_DEGENERATE = ["none", "zeros", "constant", "duplicate", "huge", "tiny", "rank1", "offset"]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    n=st.integers(3, 40),
    n_layers=st.integers(1, 4),
    dim=st.integers(1, 16),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    task=st.sampled_from(["classification", "regression", "label_free"]),
    preset=st.sampled_from(["robust", "reference"]),
    degenerate=st.sampled_from(_DEGENERATE),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_scores_are_finite_or_a_loes_error(
    n, n_layers, dim, dtype, task, preset, degenerate, k, seed
):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_layers, dim, generator=g, dtype=torch.float64)
    bad = x[:, 0]
    if degenerate == "zeros":
        bad.zero_()
    elif degenerate == "constant":
        bad.fill_(0.1)
    elif degenerate == "duplicate" and n_layers > 1:
        x[:, 1] = x[:, 0]
    elif degenerate == "huge":
        bad.mul_(1e30 if dtype == torch.float64 else 1e3)
    elif degenerate == "tiny":
        bad.mul_(1e-30 if dtype == torch.float64 else 1e-3)
    elif degenerate == "rank1":
        bad.copy_(
            torch.outer(
                torch.randn(n, generator=g, dtype=torch.float64),
                torch.ones(dim, dtype=torch.float64),
            )
        )
    elif degenerate == "offset":
        bad.add_(1e4)
    x = x.to(dtype)
    y = None
    if task == "classification":
        y = torch.randint(0, 3, (n,), generator=g)
    elif task == "regression":
        y = torch.randn(n, generator=g)
    try:
        res = select(x, y, k=min(k, n_layers), task=task, preset=preset)
    except LOESError:
        return
    values = [
        v for table in res.steps for vs in table.terms.values() for v in vs
    ] + res.layer_scores
    assert all(math.isfinite(v) for v in values)
    assert len(res.selected_layers) == min(k, n_layers)
