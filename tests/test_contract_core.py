"""The core's contract under bad and odd input (issue 9), table-driven.

Each row of ``BAD`` is (id, call, error class, stable message fragment): the
call must raise exactly that class with that fragment, never a deep numpy or
torch error, and must do so before any expensive work (rows marked "first"
pass an object that fails the test if its data are ever read). Each row of
``ODD`` is usable input that must not raise, with the outcome it must give.
Rows tagged ``[9.x]`` reproduce an item of issue 9 (they failed before the fix).
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch
from conftest import planted

from loes import LOESError, LOESSelector, LOESWarning, select_layers_from_custom_embeddings

RNG = np.random.default_rng(0)
X = RNG.normal(size=(30, 4, 8)).astype(np.float32)
Y = np.arange(30) % 3
XP, YP = planted(
    120, 16, informative=(2, 0), n_layers=5, seed=3
)  # layers 2 then 0 carry the labels


def select(x=X, y=Y, k=1, **kw):
    kw.setdefault("show_progress", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LOESWarning)
        return select_layers_from_custom_embeddings(x, y, k=k, **kw)


class Untouchable:
    """Embeddings whose data must never be read: validation of cheap arguments comes first."""

    def __array__(self, *args, **kwargs):
        raise AssertionError("the embeddings were read before the cheap checks")

    shape = (30, 4, 8)


def _with(**changes):
    def call():
        x = X.copy()
        for (i, j, l), v in changes.get("set", {}).items():
            x[i, j, l] = v
        return select(x, Y)

    return call


def _masked(n_masked):
    m = np.ma.masked_array(X, mask=np.zeros(X.shape, bool))
    m.mask.reshape(-1)[:n_masked] = True
    return m


def _fitted():
    return LOESSelector(k=1).fit(X, Y)


def _widths():
    return [RNG.normal(size=(30, d)).astype(np.float32) for d in (8, 8, 8, 8)]


def _sparse():
    return torch.from_numpy(X).to_sparse()


def _huge_finite():
    x = X.astype(np.float64)
    x[:, 1] = 1e306
    return x


def _nan_fp16():
    x = torch.from_numpy(X).half()
    x[0, 3, 0] = float("inf")
    return x


def _dead_by_offset():
    x = XP.copy()
    x[:, 2] += np.float32(1e8)  # float32 rounding at 1e8 is 8: the layer's spread is gone
    return x


BAD = [
    # ---------------------------------------------------------------- shapes
    ("2-D array", lambda: select(X[:, 0]), LOESError, "for a single layer use X[:, None, :]"),
    ("4-D array", lambda: select(X[:, :, :, None]), LOESError, "pool spatial or token axes first"),
    ("no samples", lambda: select(np.zeros((0, 4, 8))), LOESError, "no samples"),
    ("empty list", lambda: select([]), LOESError, "empty sequence"),
    ("no layers", lambda: select(np.zeros((30, 0, 8))), LOESError, "no layers"),
    ("zero width", lambda: select(np.zeros((30, 4, 0))), LOESError, "layer 0 has dimension 0"),
    ("two samples", lambda: select(X[:2], Y[:2]), LOESError, "at least 3 calibration samples"),
    (
        "layers differ in N",
        lambda: select([X[:, 0], X[:20, 1]]),
        LOESError,
        "same number of samples",
    ),
    ("3-D layer in list", lambda: select([X, X]), LOESError, "flatten or pool spatial axes first"),
    (
        "[9.7] list mixes arrays and lists",
        lambda: select([X[:, 0], X[:, 1].tolist()]),
        LOESError,
        "mixes arrays and nested lists",
    ),
    ("[9.7] nested list 2-D", lambda: select(X[:, 0].tolist()), LOESError, "got 2-D array"),
    (
        "ragged nested list",
        lambda: select([[[1.0, 2.0]], [[1.0]]]),
        LOESError,
        "torch tensor or numpy array",
    ),
    ("string array", lambda: select(np.full((30, 4, 8), "a")), LOESError, "must be numeric"),
    ("object array", lambda: select(np.empty((30, 4, 8), dtype=object)), LOESError, "object array"),
    (
        "datetime array",
        lambda: select(np.zeros((30, 4, 8), dtype="datetime64[s]")),
        LOESError,
        "must be numeric",
    ),
    (
        "layer_names length",
        lambda: select(layer_names=["a"]),
        LOESError,
        "layer_names has 1 names for 4 layers",
    ),
    (
        "layer_names a string",
        lambda: select(layer_names="abcd"),
        LOESError,
        "layer_names must be a sequence",
    ),
    # --------------------------------------------------------------- dtypes and kinds
    ("[9.7] complex numpy", lambda: select(X.astype(np.complex64)), LOESError, "is complex"),
    (
        "[9.7] complex torch",
        lambda: select(torch.from_numpy(X).to(torch.complex64)),
        LOESError,
        "is complex",
    ),
    (
        "[9.7] masked entries",
        lambda: select(_masked(5)),
        LOESError,
        "masked array with 5 masked entries",
    ),
    ("[9.11] sparse tensor", lambda: select(_sparse()), LOESError, "sparse tensor"),
    (
        "[9.11] meta tensor",
        lambda: select(torch.empty(30, 4, 8, device="meta")),
        LOESError,
        "meta device",
    ),
    (
        "[9.11] sparse layer in list",
        lambda: select([_sparse()[:, 0], torch.from_numpy(X[:, 1])]),
        LOESError,
        "embeddings[0] is a sparse tensor",
    ),
    ("NaN", _with(set={(3, 2, 1): np.nan}), LOESError, "1 NaN/Inf values in layer 2"),
    (
        "inf",
        _with(set={(3, 1, 1): np.inf, (4, 1, 1): -np.inf}),
        LOESError,
        "2 NaN/Inf values in layer 1",
    ),
    ("fp16 overflow", lambda: select(_nan_fp16()), LOESError, "NaN/Inf values in layer 3"),
    (
        "[9.11] finite 1e306 is not '0 NaN/Inf'",
        lambda: select(_huge_finite()),
        LOESError,
        "finite but as large as 1e+306",
    ),
    # --------------------------------------------------------------------- k
    ("k=0", lambda: select(k=0), LOESError, "k must be between 1"),
    ("k=-1", lambda: select(k=-1), LOESError, "k must be between 1"),
    (
        "k > n_layers",
        lambda: select(k=5),
        LOESError,
        "between 1 and the number of layers (4); got 5",
    ),
    ("k=1.5", lambda: select(k=1.5), LOESError, "k must be an integer"),
    ("k='2'", lambda: select(k="2"), LOESError, "k must be an integer"),
    ("k=True", lambda: select(k=True), LOESError, "k must be an integer"),
    ("k=None", lambda: select(k=None), LOESError, "must be given"),
    ("[9.4] k=0 first", lambda: select(Untouchable(), k=0), LOESError, "k must be between 1"),
    ("k=2.0 first", lambda: select(Untouchable(), k=2.0), LOESError, "k must be an integer"),
    # --------------------------------------------------------------- options
    (
        "unknown option",
        lambda: select(foo=1),
        LOESError,
        "unknown option(s) ['foo'] for preset='robust'",
    ),
    ("typo orth_reg", lambda: select(orht_reg=1.0), LOESError, "did you mean 'orth_reg'?"),
    (
        "typo standardize",
        lambda: select(standardise=False),
        LOESError,
        "did you mean 'standardize'?",
    ),
    ("typo cka_samples", lambda: select(cka_sample=64), LOESError, "did you mean 'cka_samples'?"),
    (
        "removed fallback",
        lambda: select(fallback="marginal"),
        LOESError,
        "unknown option(s) ['fallback']",
    ),
    (
        "cv for reference",
        lambda: select(preset="reference", cv="gcv"),
        LOESError,
        "['cv'] for preset='reference'",
    ),
    (
        "[9.4] unknown option first",
        lambda: select(Untouchable(), foo=1),
        LOESError,
        "unknown option(s) ['foo']",
    ),
    ("cv kfold", lambda: select(cv="kfold"), LOESError, "cv must be 'loo'"),
    (
        "[9.5] standardize='no'",
        lambda: select(standardize="no"),
        LOESError,
        "standardize must be True or False",
    ),
    (
        "standardize=1",
        lambda: select(standardize=1),
        LOESError,
        "standardize must be True or False",
    ),
    (
        "cka_debiased='yes'",
        lambda: select(cka_debiased="yes"),
        LOESError,
        "cka_debiased must be True or False",
    ),
    (
        "[9.5] cka_samples=0",
        lambda: select(cka_samples=0),
        LOESError,
        "cka_samples must be an integer >= 4",
    ),
    (
        "cka_samples=3",
        lambda: select(cka_samples=3),
        LOESError,
        "cka_samples must be an integer >= 4",
    ),
    (
        "cka_samples=2.5",
        lambda: select(cka_samples=2.5),
        LOESError,
        "cka_samples must be an integer >= 4",
    ),
    (
        "[9.11] cka_samples=None memory guard",
        lambda: select(
            np.zeros((20000, 3, 1), np.float32) + np.arange(20000.0)[:, None, None] % 7,
            np.arange(20000) % 2,
            k=2,
            cka_samples=None,
        ),
        LOESError,
        "pass cka_samples=512",
    ),
    ("orth_rank=0", lambda: select(orth_rank=0), LOESError, "orth_rank must be an integer >= 1"),
    (
        "orth_rank=2.0",
        lambda: select(orth_rank=2.0),
        LOESError,
        "orth_rank must be an integer >= 1",
    ),
    ("preset", lambda: select(preset="fast"), LOESError, "preset must be one of"),
    (
        "preset first",
        lambda: select(Untouchable(), preset="fast"),
        LOESError,
        "preset must be one of",
    ),
    ("beta and gamma", lambda: select(beta=0.1, gamma=0.2), LOESError, "either 'beta' or 'gamma'"),
    # ------------------------------------------------------- hyper-parameters
    (
        "[9.5] reg=inf",
        lambda: select(reg=float("inf")),
        LOESError,
        "reg must be a positive finite number",
    ),
    (
        "reg=nan",
        lambda: select(reg=float("nan")),
        LOESError,
        "reg must be a positive finite number",
    ),
    ("reg=0", lambda: select(reg=0.0), LOESError, "reg must be a positive finite number"),
    ("reg=-1", lambda: select(reg=-1), LOESError, "reg must be a positive finite number"),
    (
        "reference reg=inf",
        lambda: select(preset="reference", reg=float("inf")),
        LOESError,
        "reg must be a positive finite number",
    ),
    (
        "[9.5] alpha=inf",
        lambda: select(alpha=float("inf")),
        LOESError,
        "alpha must be a non-negative finite",
    ),
    ("alpha=-1", lambda: select(alpha=-1.0), LOESError, "alpha must be a non-negative finite"),
    (
        "gamma=nan",
        lambda: select(gamma=float("nan")),
        LOESError,
        "gamma must be a non-negative finite",
    ),
    (
        "beta=inf",
        lambda: select(beta=float("inf")),
        LOESError,
        "gamma must be a non-negative finite",
    ),
    ("eta=-0.5", lambda: select(eta=-0.5), LOESError, "eta must be a non-negative finite"),
    (
        "[9.5] orth_reg=-1",
        lambda: select(orth_reg=-1.0),
        LOESError,
        "orth_reg must be a positive finite",
    ),
    (
        "orth_reg=inf",
        lambda: select(orth_reg=float("inf")),
        LOESError,
        "orth_reg must be a positive finite",
    ),
    ("alpha='0.1'", lambda: select(alpha="0.1"), LOESError, "alpha must be a number"),
    ("reg=True", lambda: select(reg=True), LOESError, "reg must be a number"),
    (
        "reg=inf first",
        lambda: select(Untouchable(), reg=float("inf")),
        LOESError,
        "reg must be a positive",
    ),
    # --------------------------------------------------------------- targets
    ("targets None", lambda: select(y=None), LOESError, "targets are required"),
    ("targets length", lambda: select(y=Y[:20]), LOESError, "one row per sample (30)"),
    ("one class", lambda: select(y=np.zeros(30)), LOESError, "at least 2 classes"),
    (
        "regression strings",
        lambda: select(y=np.array(["a", "b", "c"] * 10), task="regression"),
        LOESError,
        "regression targets must be numeric",
    ),
    (
        "regression NaN",
        lambda: select(y=np.r_[np.nan, np.ones(29)], task="regression"),
        LOESError,
        "contain NaN/Inf",
    ),
    (
        "regression constant",
        lambda: select(y=np.full(30, 2.0), task="regression"),
        LOESError,
        "constant",
    ),
    (
        "non-integer float labels",
        lambda: select(y=np.linspace(0, 1, 30)),
        LOESError,
        "non-integer floats",
    ),
    (
        "[9.7] soft labels off",
        lambda: select(y=0.5 * np.eye(3)[Y]),
        LOESError,
        "one-hot or soft labels",
    ),
    (
        "[9.7] soft labels negative",
        lambda: select(y=np.eye(3)[Y] * 1.5 - 0.25),
        LOESError,
        "one-hot or soft labels",
    ),
    ("one-column one-hot", lambda: select(y=np.ones((30, 1))), LOESError, "at least 2 columns"),
    (
        "[9.7] complex targets",
        lambda: select(y=Y.astype(np.complex128), task="regression"),
        LOESError,
        "targets are complex",
    ),
    (
        "[9.7] masked targets",
        lambda: select(y=np.ma.masked_array(Y, mask=Y == 2)),
        LOESError,
        "masked array with 10 masked entries",
    ),
    ("3-D targets", lambda: select(y=np.zeros((30, 2, 2))), LOESError, "1-D or 2-D"),
    ("task", lambda: select(task="segmentation"), LOESError, "task must be"),
    # ----------------------------------------------------------- random_state
    (
        "[9.8] random_state=1.5",
        lambda: select(random_state=1.5),
        LOESError,
        "random_state must be None, an int",
    ),
    (
        "[9.8] random_state='42'",
        lambda: select(random_state="42"),
        LOESError,
        "random_state must be None, an int",
    ),
    (
        "[9.8] random_state=True",
        lambda: select(random_state=True),
        LOESError,
        "random_state must be None, an int",
    ),
    ("random_state=-1", lambda: select(random_state=-1), LOESError, "non-negative integer seed"),
    (
        "random_state first",
        lambda: select(Untouchable(), random_state="42"),
        LOESError,
        "random_state must be",
    ),
    # -------------------------------------------------------------- estimator
    ("transform before fit", lambda: LOESSelector(k=1).transform(X), LOESError, "not fitted"),
    ("transform fewer layers", lambda: _fitted().transform(X[:, :3]), LOESError, "fitted on 4"),
    (
        "[9.7] transform other width",
        lambda: _fitted().transform(X[:, :, :6]),
        LOESError,
        "layer 0 of X has width 6 but had width 8 in fit",
    ),
    (
        "[9.7] transform other width in a list",
        lambda: LOESSelector(k=1).fit(_widths(), Y).transform(_widths()[:3] + [X[:, 0, :5]]),
        LOESError,
        "layer 3 of X has width 5",
    ),
    ("set_params unknown", lambda: LOESSelector().set_params(kk=2), LOESError, "invalid parameter"),
    (
        "[9.8] estimator random_state",
        lambda: LOESSelector(k=1, random_state="42").fit(X, Y),
        LOESError,
        "random_state must be",
    ),
    (
        "estimator option",
        lambda: LOESSelector(k=1, options={"cka_samples": 0}).fit(X, Y),
        LOESError,
        "cka_samples must be an integer",
    ),
    ("estimator k=0", lambda: LOESSelector(k=0).fit(X, Y), LOESError, "k must be between 1"),
    (
        "estimator unknown option",
        lambda: LOESSelector(options={"fallback": "none"}).fit(X, Y),
        LOESError,
        "unknown option(s) ['fallback']",
    ),
    # ---------------------------------------------------------------- scale
    (
        "[9.2] offset swallows the signal",
        lambda: select(_dead_by_offset(), YP, k=2),
        LOESError,
        "an offset has swallowed the signal",
    ),
]


@pytest.mark.parametrize("call,error,fragment", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_raises_a_clear_error(call, error, fragment):
    with pytest.raises(error) as info:
        call()
    assert info.type is error
    assert fragment in str(info.value)


# ------------------------------------------------------------------ odd but usable
def _picks(x, y=YP, k=2, **kw):
    return select(x, y, k=k, **kw).selected_layers


BASE_PICKS = [2, 0]


def _nested_list():
    res = select(XP[:40].tolist(), YP[:40], k=2)
    ref = select(XP[:40], YP[:40], k=2)
    return res.num_layers_seen == 5 and res.selected_layers == ref.selected_layers


def _requires_grad():
    """No autograd graph is built (nothing saved for backward), so no extra memory."""
    x = torch.from_numpy(XP).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.shape) or t, lambda t: t
    ):
        res = select(x, YP, k=2)
    return not saved and x.grad is None and res.selected_layers == BASE_PICKS


def _shifted(layer, offset, dtype=np.float32):
    x = XP.astype(dtype).copy()
    x[:, layer] += dtype(offset)
    return x


def _scaled(layer, factor, dtype=np.float64):
    x = XP.astype(dtype).copy()
    x[:, layer] *= dtype(factor)
    return x


def _mean_1e5_sqrt_d_not_excluded():
    res = select(_shifted(4, 1e5 * np.sqrt(16), np.float64), YP, k=2)
    return res.excluded_layers == [] and res.selected_layers == BASE_PICKS


def _huge_offset_float64():
    """Beyond ~1e18 a float64 layer of unit spread is exactly constant: excluded with a
    warning (or a LOESError), never a bare torch error."""
    try:
        res = select(_shifted(2, 1e18, np.float64), YP, k=2)
    except LOESError:
        return True
    return 2 in res.excluded_layers


def _seed_recorded(rs, expected):
    res = select(XP, YP, k=2, random_state=rs)
    return res.config["random_state"] == expected and isinstance(res.config["seed"], int)


def _generators_repeat(make):
    a = select(XP, YP, k=3, random_state=make())
    b = select(XP, YP, k=3, random_state=make())
    return a.selected_layers[:2] == BASE_PICKS and a.config["seed"] == b.config["seed"]


def _get_params_from_signature():
    names = [p for p in inspect.signature(LOESSelector.__init__).parameters if p != "self"]
    return sorted(LOESSelector().get_params()) == sorted(names)


ODD = [
    ("[9.7] nested list is (N, L, D)", _nested_list),
    ("[9.11] requires_grad input is detached", _requires_grad),
    ("masked array without masked entries", lambda: _picks(np.ma.masked_array(XP)) == BASE_PICKS),
    ("valid soft labels", lambda: _picks(XP, 0.9 * np.eye(4)[YP] + 0.025)[0] == 2),
    (
        "integer embeddings",
        lambda: select(np.round(XP * 10).astype(np.int32), YP, k=1).selected_layers == [2],
    ),
    ("k as numpy int", lambda: _picks(XP, k=np.int64(2)) == BASE_PICKS),
    ("[9.2] feature means 1e5*sqrt(D) not excluded", _mean_1e5_sqrt_d_not_excluded),
    (
        "[9.2] +1e5 on the informative layer (float32)",
        lambda: _picks(_shifted(2, 1e5)) == BASE_PICKS,
    ),
    ("+1e5 on a noise layer (float32)", lambda: _picks(_shifted(3, 1e5)) == BASE_PICKS),
    ("scale 1e-20 (float64)", lambda: _picks(_scaled(2, 1e-20)) == BASE_PICKS),
    ("[9.2] scale 1e20 (float64)", lambda: _picks(_scaled(2, 1e20)) == BASE_PICKS),
    ("[9.2] scale 1e20 (float32)", lambda: _picks(_scaled(2, 1e20, np.float32)) == BASE_PICKS),
    ("[9.2] scale 1e-30 (float32)", lambda: _picks(_scaled(0, 1e-30, np.float32)) == BASE_PICKS),
    ("offset 1e18 (float64)", _huge_offset_float64),
    (
        "reference preset, scale 1e20",
        lambda: len(_picks(_scaled(2, 1e20), preset="reference")) == 2,
    ),
    ("[9.8] int seed recorded", lambda: _seed_recorded(np.int64(7), 7)),
    ("[9.8] None is fresh randomness", lambda: _seed_recorded(None, None)),
    ("[9.8] numpy Generator", lambda: _generators_repeat(lambda: np.random.default_rng(5))),
    ("[9.8] numpy RandomState", lambda: _generators_repeat(lambda: np.random.RandomState(5))),
    ("[9.8] torch Generator", lambda: _generators_repeat(lambda: torch.Generator().manual_seed(5))),
    ("get_params from __init__", _get_params_from_signature),
]


@pytest.mark.parametrize("check", [c[1] for c in ODD], ids=[c[0] for c in ODD])
def test_odd_but_usable_input_works(check):
    assert check()


def test_the_table_is_large_enough():
    assert len(BAD) + len(ODD) >= 70
