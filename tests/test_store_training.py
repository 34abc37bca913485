"""Training and measuring on a feature store: the streamed paths equal their in-memory twins."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from loes import LOESError, LOESWarning
from loes.metrics import profile, streaming_profile
from loes.store import FeatureWriter
from loes.sweep import sweep_layers_streaming
from loes.transfer import FusionProbe, LinearProbe

LAYERS = [3, 5, 7, 9]  # model layers held by the stores (positions 0..3 in memory)


def _store(folder, x, y, shard_rows=37):
    w = FeatureWriter(
        folder, layers=LAYERS, widths=[x.shape[2]] * x.shape[1], shard_rows=shard_rows, plan={}
    )
    for s in w.pending(len(x)):
        rows = w.shard_rows_of(s, len(x))
        w.write(s, x[rows], targets=None if y is None else y[rows])
    return w.finish(len(x))


def _planted(n=300, seed=0, regression=False):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, 4, 10)) * 3 + 5).astype(np.float32)  # offsets and scales to undo
    signal = x[:, 2, 0] + 0.5 * x[:, 1, 3]
    y = signal + 0.3 * rng.normal(size=n) if regression else (signal > 7.5).astype(int)
    return x, y


@pytest.mark.parametrize("regression", [False, True])
def test_linear_probe_on_a_store_equals_the_in_memory_probe(tmp_path, regression):
    x, y = _planted(regression=regression)
    task = "regression" if regression else "classification"
    train, val = (
        _store(tmp_path / "tr", x[:200], y[:200]),
        _store(tmp_path / "va", x[200:], y[200:]),
    )
    mem = LinearProbe(layers=[1, 2], task=task).fit(x[:200], y[:200], x[200:], y[200:])
    streamed = LinearProbe(layers=[5, 7], task=task).fit(train, val_embeddings=val)
    assert streamed.best_param_ == mem.best_param_
    for r, v in mem.val_scores_.items():
        assert streamed.val_scores_[r] == pytest.approx(v, abs=1e-12)
    torch.testing.assert_close(streamed.coef_, mem.coef_, rtol=0, atol=1e-10)
    torch.testing.assert_close(streamed.intercept_, mem.intercept_, rtol=0, atol=1e-10)
    # scored on the store, or on in-memory rows of just its layers: the same predictions
    assert streamed.score(val) == pytest.approx(mem.score(x[200:], y[200:]), abs=1e-12)
    assert streamed.score(x[200:, 1:3], y[200:]) == pytest.approx(streamed.score(val), abs=1e-12)
    if not regression:
        assert streamed.score(val) > 0.9


def test_linear_probe_on_a_store_without_validation_uses_gcv(tmp_path):
    x, y = _planted(regression=True)
    probe = LinearProbe(layers=[5, 7], task="regression").fit(_store(tmp_path, x, y))
    assert probe.validation_ == "gcv"
    assert probe.best_param_ == max(probe.val_scores_, key=probe.val_scores_.get)
    assert probe.score(x[:, 1:3], y) > 0.9


def test_fusion_probe_on_a_store_standardises_like_memory_and_learns(tmp_path):
    x, y = _planted(n=400)
    train, val = (
        _store(tmp_path / "tr", x[:300], y[:300]),
        _store(tmp_path / "va", x[300:], y[300:]),
    )
    probe = FusionProbe(layers=[5, 7], epochs=25, hidden=16, lr=3e-3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LOESWarning)  # it learns: no "constant predictor" warning
        probe.fit(train, val_embeddings=val)
    for j, pos in enumerate([1, 2]):  # the training rows' mean and ddof-1 std, as in memory
        torch.testing.assert_close(probe.means_[j], torch.from_numpy(x[:300, pos].mean(0))[None])
        want = torch.from_numpy(x[:300, pos].astype(np.float64).std(0, ddof=1)).float()[None]
        torch.testing.assert_close(probe.stds_[j], want)
    assert probe.score(val) > 0.85
    assert probe.score(x[300:, 1:3], y[300:]) == pytest.approx(probe.score(val))


def test_fusion_probe_on_a_store_holds_out_rows_and_warns_without_signal(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 4, 8)).astype(np.float32)
    y = (rng.random(300) < 0.25).astype(int)  # unrelated to x: nothing to learn
    probe = FusionProbe(epochs=3, hidden=8, val_fraction=0.2, random_state=0)
    with pytest.warns(LOESWarning, match="does not beat a constant predictor"):
        probe.fit(_store(tmp_path, x, y))
    assert len(probe.history_) == 3 and probe.baseline_val_score_ > 0.6


def test_store_training_errors(tmp_path):
    x, y = _planted()
    store = _store(tmp_path / "a", x, y)
    with pytest.raises(LOESError, match="use kind='ridge'"):
        LinearProbe(kind="logistic").fit(store)
    with pytest.raises(LOESError, match="val_embeddings must be a feature store too"):
        LinearProbe().fit(store, val_embeddings=x)
    with pytest.raises(LOESError, match="val_embeddings must be a feature store too"):
        FusionProbe(epochs=1).fit(store, val_embeddings=x)
    unlabelled = _store(tmp_path / "b", x, None)
    with pytest.raises(LOESError, match="has no targets"):
        LinearProbe().fit(unlabelled)
    with pytest.raises(LOESError, match="has no targets"):
        FusionProbe(epochs=1).fit(unlabelled)
    with pytest.raises(LOESError, match="fit needs targets"):
        LinearProbe().fit(x)


def test_sweep_and_label_free_metrics_read_a_store_directly(tmp_path):
    x, y = _planted(n=240, regression=True)
    train, test = (
        _store(tmp_path / "tr", x[:160], y[:160]),
        _store(tmp_path / "te", x[160:], y[160:]),
    )
    streamed = sweep_layers_streaming(  # a callable gives a fresh pass of 37-row batches
        lambda: train.batches(37), test, task="regression", show_progress=False
    )
    listed = sweep_layers_streaming(
        [(x[i : min(i + 37, 160)], y[i : min(i + 37, 160)]) for i in range(0, 160, 37)],
        [(x[160:], y[160:])],
        task="regression",
        show_progress=False,
    )
    assert streamed.best_layer() == listed.best_layer() == 2
    np.testing.assert_allclose(streamed.scores_, listed.scores_, atol=1e-9)
    prof = streaming_profile(train, show_progress=False)
    ref = profile(x[:160], metrics=["effective_rank", "dataset_entropy"], show_progress=False)
    for name in ("effective_rank", "dataset_entropy"):
        np.testing.assert_allclose(prof.values[name], ref.values[name], rtol=1e-6)


def test_selection_on_a_store_uses_its_rows_targets_and_names(tmp_path):
    from loes import select_layers_from_custom_embeddings

    x, y = _planted()
    names = [f"hidden_states[{i + 1}]" for i in range(12)]
    w = FeatureWriter(tmp_path, layers=LAYERS, widths=[10] * 4, shard_rows=64, plan={},
                      layer_names=names)  # fmt: skip
    for s in w.pending(len(x)):
        rows = w.shard_rows_of(s, len(x))
        w.write(s, x[rows], targets=y[rows])
    store = w.finish(len(x))
    res = select_layers_from_custom_embeddings(store, k=2, show_progress=False)
    ref = select_layers_from_custom_embeddings(x, y, k=2, show_progress=False)
    assert res.selected_layers == ref.selected_layers
    assert res.layer_names == ["hidden_states[4]", "hidden_states[6]", "hidden_states[8]",
                               "hidden_states[10]"]  # fmt: skip
    assert store.stored_names == res.layer_names
