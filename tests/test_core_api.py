"""Bad input, warnings, the estimator and the package's import hygiene."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import planted, run_python

from loes import LOESError, LOESSelector, LOESWarning, select_layers_from_custom_embeddings


def select(x, y=None, k=1, **kw):
    kw.setdefault("show_progress", False)
    return select_layers_from_custom_embeddings(x, y, k=k, **kw)


X = np.random.default_rng(0).normal(size=(30, 4, 8)).astype(np.float32)
Y = np.arange(30) % 3


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            dict(x=X[:, 0]),
            r"got 2-D array of shape \(30, 8\): for a single layer use X\[:, None, :\]",
        ),
        (dict(x=X[None]), r"shape \(n_samples, n_layers, dim\)"),
        (dict(x=np.zeros((0, 4, 8))), "no samples"),
        (dict(x=[]), "empty"),
        (dict(x=X, k=0), "between 1 and the number of layers"),
        (dict(x=X, k=5), r"between 1 and the number of layers \(4\); got 5"),
        (dict(x=X, k=None), "k .* must be given"),
        (dict(x=X, y=Y[:20]), r"one row per sample \(30\)"),
        (dict(x=X, y=np.zeros(30)), "at least 2 classes"),
        (dict(x=X, y=None), "targets are required"),
        (
            dict(x=X, y=np.array(["a", "b", "c"] * 10), task="regression"),
            "regression targets must be numeric",
        ),
        (dict(x=X, task="segmentation"), "task must be"),
        (dict(x=X, preset="fast"), "preset must be one of"),
        (dict(x=X, alpha=-1.0), "alpha must be a non-negative"),
        (dict(x=X, y=np.full(30, 2.0), task="regression"), "constant"),
        (dict(x=X, y=np.linspace(0, 1, 30), task="classification"), "non-integer floats"),
        (dict(x=[X[:, 0], X[:20, 1]]), "same number of samples"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, match):
    x = kwargs.pop("x")
    y = kwargs.pop("y", Y)
    k = kwargs.pop("k", 1)
    with pytest.raises(LOESError, match=match):
        select(x, y, k=k, **kwargs)


def test_nan_and_inf_are_reported_with_the_layer():
    x = X.copy()
    x[3, 2, 1] = np.nan
    with pytest.raises(LOESError, match="NaN/Inf values in layer 2"):
        select(x, Y)
    x[3, 2, 1] = np.inf
    with pytest.raises(LOESError, match="layer 2"):
        select(x, Y, preset="reference")


def test_loes_error_is_a_value_error():
    with pytest.raises(ValueError):
        select(X, Y, k=9)


def test_ignore_index_labels_are_dropped_with_a_warning():
    x, y = planted(120, 16, informative=(2,), n_layers=4, seed=1)
    y_masked = y.copy()
    y_masked[:10] = -100
    with pytest.warns(LOESWarning, match="dropping 10 samples labelled -100"):
        res = select(x, y_masked, k=1)
    assert res.num_calibration_samples == 110
    ref = select(x[10:], y[10:], k=1)
    assert res.layer_scores == pytest.approx(ref.layer_scores, rel=1e-6)


def test_degenerate_data_warnings():
    x, y = planted(40, 64, informative=(1,), n_layers=3, seed=0, dead=(2,))
    y = y.copy()
    y[0] = 7  # a class with one sample
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = select(x, y, k=1)
    messages = " | ".join(str(w.message) for w in caught if issubclass(w.category, LOESWarning))
    # N <= D is normal for the robust preset (its fit is out of sample): not warned
    assert "calibration samples <= dimension" not in messages
    with pytest.warns(LOESWarning, match="N=40 calibration samples <= dimension 64"):
        select(x, y, k=1, preset="reference")
    assert "single sample" in messages
    assert "constant" in messages
    assert res.excluded_layers == [2]
    assert len(res.warnings) == 2  # recorded in the result too


def test_too_few_live_layers_for_k():
    x = X.copy()
    x[:, 1:] = 1.0
    with pytest.raises(LOESError, match="only 1 layer"):
        select(x, Y, k=2)


def test_estimator_in_a_pipeline():
    sklearn = pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    x, y = planted(300, 16, informative=(3,), n_layers=5, seed=2)
    pipe = Pipeline([("layers", LOESSelector(k=1)), ("clf", LogisticRegression(max_iter=500))])
    pipe.fit(x, y)
    assert pipe.named_steps["layers"].selected_layers_ == [3]
    assert pipe.score(x, y) > 0.9
    out = pipe.named_steps["layers"].transform(torch.from_numpy(x))
    assert isinstance(out, torch.Tensor) and torch.equal(out, torch.from_numpy(x[:, 3]))
    assert sklearn.base.clone(pipe.named_steps["layers"]).get_params()["k"] == 1


def test_estimator_repr_feature_names_and_pandas_output():
    pytest.importorskip("pandas")
    x, y = planted(200, 8, informative=(3,), n_layers=5, seed=2)
    sel = LOESSelector(k=2, random_state=3)
    assert repr(sel) == "LOESSelector(k=2, random_state=3)"
    assert repr(LOESSelector()) == "LOESSelector()"
    sel.fit(x, y)
    names = sel.get_feature_names_out()
    first = sel.selected_layers_[0]
    assert len(names) == 16 and names[0] == f"layer{first}_0" and names[8].endswith("_0")
    frame = sel.set_output(transform="pandas").transform(x)
    assert list(frame.columns) == list(names)
    np.testing.assert_array_equal(
        frame.to_numpy(), np.concatenate([x[:, i] for i in sel.selected_layers_], 1)
    )
    with pytest.raises(LOESError, match="set_output"):
        sel.set_output(transform="polars")


def test_estimator_errors():
    sel = LOESSelector(k=1)
    with pytest.raises(LOESError, match="not fitted"):
        sel.transform(X)
    sel.fit(X, Y)
    with pytest.raises(LOESError, match="fitted on 4"):
        sel.transform(X[:, :3])
    with pytest.raises(LOESError, match="invalid parameter"):
        sel.set_params(kk=2)


def test_import_loes_stays_light():
    code = (
        "import sys, loes; loes.LOESResult; "
        "heavy = [m for m in ('transformers', 'datasets', 'matplotlib', 'sklearn', 'pandas') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    assert run_python(code).stdout.strip() == ""


def test_warnings_point_at_the_callers_line():
    x, _ = planted(200, 32, informative=(2,), n_layers=6, seed=3, dead=(0,))
    y = np.random.default_rng(0).integers(0, 3, 200)  # unrelated to the features: warned at step 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        select_layers_from_custom_embeddings(x, y, k=3, show_progress=False)
    found = {str(w.message): w.filename for w in caught if issubclass(w.category, LOESWarning)}
    assert any("constant" in m for m in found) and any("no layer explains" in m for m in found), (
        found
    )
    assert set(found.values()) == {__file__}
