"""The feature store: shards written in any order read back as the rows that went in."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from loes import LOESError
from loes.store import FeatureWriter, is_store, load_features


def _data(n=23, widths=(4, 4, 4), seed=0):
    rng = np.random.default_rng(seed)
    feats = [rng.normal(size=(n, d)).astype(np.float32) for d in widths]
    return feats, rng.integers(0, 3, size=n)


def _write(path, feats, y, *, shard_rows=5, order=None, layers=None, **kw):
    n = len(y)
    w = FeatureWriter(
        path,
        layers=layers or list(range(len(feats))),
        widths=[f.shape[1] for f in feats],
        shard_rows=shard_rows,
        plan={"model": "m"},
        **kw,
    )
    shards = w.pending(n)
    for s in order(shards) if order else shards:
        rows = w.shard_rows_of(s, n)
        w.write(s, [f[rows] for f in feats], targets=y[rows])
    return w


@pytest.mark.parametrize("widths", [(4, 4, 4), (3, 8, 5)])
def test_roundtrip_in_any_shard_order(tmp_path, widths):
    feats, y = _data(widths=widths)
    store = _write(tmp_path, feats, y, order=lambda s: s[::-1]).finish(len(y))
    assert is_store(tmp_path) and len(store) == 23
    x, targets = store.load()
    parts = list(x.unbind(1)) if torch.is_tensor(x) else x
    for got, want in zip(parts, feats):
        np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_array_equal(targets, y)


def test_batches_span_shards_and_select_layers(tmp_path):
    feats, y = _data()
    store = _write(tmp_path, feats, y, layers=[2, 5, 9]).finish(len(y))
    batches = list(store.batches(7, layers=[9, 2], with_indices=True))
    assert [len(b[1]) for b in batches] == [7, 7, 7, 2]
    x = torch.cat([b[0] for b in batches])
    assert x.shape == (23, 2, 4)
    np.testing.assert_array_equal(x[:, 0].numpy(), feats[2])  # layer 9 is the third stored
    np.testing.assert_array_equal(x[:, 1].numpy(), feats[0])
    np.testing.assert_array_equal(np.concatenate([b[2] for b in batches]), np.arange(23))
    with pytest.raises(LOESError, match="layer 4 is not in the store"):
        next(store.batches(4, layers=[4]))


def test_shuffled_batches_visit_every_row_once_with_its_target(tmp_path):
    feats, y = _data(n=31)
    store = _write(tmp_path, feats, y, shard_rows=6).finish(31)
    seen = []
    for x, t, idx in store.batches(4, shuffle=True, random_state=3, with_indices=True):
        np.testing.assert_array_equal(x[:, 1].numpy(), feats[1][idx])
        np.testing.assert_array_equal(t, y[idx])
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(31)) and seen != list(range(31))


def test_resume_skips_finished_shards_and_refuses_other_settings(tmp_path):
    feats, y = _data()
    w = FeatureWriter(tmp_path, layers=[0, 1, 2], widths=[4] * 3, shard_rows=5, plan={"model": "m"})
    w.write(0, [f[:5] for f in feats], targets=y[:5])
    with pytest.raises(LOESError, match="4 of 5 shards are not written"):
        w.finish(23)
    again = FeatureWriter(
        tmp_path, layers=[0, 1, 2], widths=[4] * 3, shard_rows=5, plan={"model": "m"}
    )
    assert again.pending(23) == [1, 2, 3, 4]
    with pytest.raises(LOESError, match="written with other settings"):
        FeatureWriter(tmp_path, layers=[0, 1, 2], widths=[4] * 3, shard_rows=5, plan={"model": "x"})
    fresh = FeatureWriter(
        tmp_path,
        layers=[0, 1, 2],
        widths=[4] * 3,
        shard_rows=5,
        plan={"model": "x"},
        overwrite=True,
    )
    assert fresh.pending(23) == [0, 1, 2, 3, 4]


def test_truncated_shard_is_not_counted_as_done(tmp_path):
    feats, y = _data()
    w = _write(tmp_path, feats, y)
    shard = tmp_path / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:40])
    assert w.pending(23) == [2]


def test_string_targets_and_no_targets(tmp_path):
    feats, y = _data(n=9)
    labels = np.array(["neg", "pos", "neu"])[y]
    store = _write(tmp_path / "a", feats, labels, shard_rows=4).finish(9)
    np.testing.assert_array_equal(store.load()[1], labels)
    w = FeatureWriter(tmp_path / "b", layers=[0], widths=[4], shard_rows=4, plan={})
    for s in w.pending(9):
        w.write(s, [feats[0][w.shard_rows_of(s, 9)]])
    assert w.finish(9).load()[1] is None


def test_bad_inputs_are_clear_errors(tmp_path):
    feats, y = _data()
    with pytest.raises(LOESError, match="one width per layer"):
        FeatureWriter(tmp_path, layers=[0, 1], widths=[4], shard_rows=5, plan={})
    with pytest.raises(LOESError, match="shard_rows must be a positive int"):
        FeatureWriter(tmp_path, layers=[0], widths=[4], shard_rows=0, plan={})
    w = FeatureWriter(tmp_path, layers=[0, 1], widths=[4, 4], shard_rows=5, plan={})
    with pytest.raises(LOESError, match=r"has shape \(5, 3\), expected \(5, 4\)"):
        w.write(0, [feats[0][:5], feats[1][:5, :3]])
    with pytest.raises(LOESError, match="3 targets for 5 rows"):
        w.write(0, [feats[0][:5], feats[1][:5]], targets=y[:3])
    with pytest.raises(LOESError, match="feature store not found"):
        load_features(tmp_path / "nope")
    with pytest.raises(LOESError, match="did not finish"):
        w.write(0, [feats[0][:5], feats[1][:5]])
        load_features(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(LOESError, match="not a loes feature-store manifest"):
        load_features(tmp_path)


def test_labels_use_the_model_layer_names(tmp_path):
    feats, y = _data()
    names = [f"hidden_states[{i + 1}]" for i in range(12)]
    store = _write(tmp_path, feats, y, layers=[3, 7, 11], layer_names=names).finish(23)
    assert store.labels == [
        "3 (hidden_states[4])",
        "7 (hidden_states[8])",
        "11 (hidden_states[12])",
    ]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_storage_reads_back_as_float32(tmp_path, dtype):
    feats, y = _data()
    store = _write(tmp_path, feats, y, dtype=dtype).finish(23)
    x, _ = store.load()
    assert x.dtype == torch.float32
    np.testing.assert_allclose(x[:, 0].numpy(), feats[0], rtol=1e-2, atol=1e-2)
    assert store.manifest["dtype"] == dtype
