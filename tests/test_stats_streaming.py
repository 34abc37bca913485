"""Streaming statistics (loes.stats), the layer sweep from moments and label-free metrics over
streams, each against its in-memory twin."""

import pickle

import numpy as np
import pytest
import torch

from loes import LOESError
from loes._linalg import RidgePath, isotropy
from loes._splits import kfold
from loes.metrics import (
    covariance_metrics,
    dataset_entropy,
    effective_rank,
    profile,
    rankme,
    streaming_profile,
)
from loes.stats import LayerMoments, MomentRidge, Moments
from loes.sweep import LayerSweep, ridge_gcv_fit, ridge_gcv_fit_moments, sweep_layers_streaming

RTOL = 1e-10


def close(got, ref, rtol=RTOL):
    """rtol on every entry, with the matrix's scale as the floor for entries near zero."""
    ref = np.asarray(ref, dtype=np.float64)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * max(np.abs(ref).max(), 1e-300))


def reference(x, y=None):
    """Two-pass in-memory float64 moments."""
    xc = x - x.mean(0)
    out = {"mean": x.mean(0), "cov": xc.T @ xc / (len(x) - 1)}
    if y is not None:
        yc = y - y.mean(0)
        out.update(cross=xc.T @ yc, y_mean=y.mean(0), y_ss=(yc**2).sum(0))
    return out


def shards(n, rng, pieces):
    """Random cut points: `pieces` non-empty contiguous row ranges covering range(n)."""
    cuts = np.sort(rng.choice(np.arange(1, n), pieces - 1, replace=False))
    return [slice(a, b) for a, b in zip([0, *cuts], [*cuts, n])]


def check_moments(m, x, y=None):
    ref = reference(x, y)
    assert m.n == len(x)
    close(m.mean, ref["mean"])
    close(m.covariance(), ref["cov"])
    if y is not None:
        close(m.cross, ref["cross"])
        close(m.y_mean, ref["y_mean"])
        close(m.y_ss, ref["y_ss"])


# ---------------------------------------------------------------- Moments
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_merges_in_any_order_and_grouping_equal_numpy(rng, dtype):
    x = torch.from_numpy(rng.normal(2.0, 3.0, size=(157, 6)) * np.exp(rng.normal(size=6)))
    x = x.to(dtype)
    y = rng.normal(size=(157, 2)) + x[:, :2].double().numpy()
    x64 = x.double().numpy()  # what the data are, once in the caller's dtype
    parts = shards(157, rng, 7)
    moments = [Moments(task="regression").update(x[s], y[s]) for s in parts]

    sequential = Moments(task="regression")
    for s in parts:
        sequential.update(x[s], y[s])
    reverse = sum(reversed(moments[1:]), moments[0])
    order = rng.permutation(7)
    tree = (moments[order[0]] + moments[order[1]]) + (
        (moments[order[2]] + moments[order[3]]) + (moments[order[4]] + moments[order[5]])
    )
    tree.merge(moments[order[6]])
    for m in (sequential, reverse, tree):
        check_moments(m, x64, y)
    assert moments[0].n == parts[0].stop  # `+` left its operands alone


def test_offset_data_where_the_raw_sum_of_squares_fails(rng):
    x = rng.normal(1e6, 1.0, size=(2000, 4))
    y = rng.normal(-3e5, 1.0, size=(2000, 1)) + x[:, :1] - 1e6
    m = Moments(task="regression")
    for s in shards(2000, rng, 9):
        m.update(x[s], y[s])
    check_moments(m, x, y)
    # means stored as shift + mean of the shifted rows keep the merge's δ a difference of small
    # numbers: 1e-13 (Chan merges of the raw means reach ~1e-11 here)
    close(m.covariance(), reference(x)["cov"], rtol=1e-13)
    close(m.cross, reference(x, y)["cross"], rtol=1e-13)
    # the test has teeth: the one-pass formula Σxxᵀ − n x̄x̄ᵀ in float64 misses rtol by far
    naive = (x.T @ x - 2000 * np.outer(x.mean(0), x.mean(0))) / 1999
    ref = reference(x)["cov"]
    assert np.abs(naive - ref).max() / np.abs(ref).max() > 1e-6
    with pytest.raises(AssertionError):
        close(naive, ref)


def test_classification_one_hot_over_a_fixed_class_list(rng):
    classes = ["b", "a", "c", "d"]  # order kept, "d" never occurs
    labels = rng.choice(["a", "b", "c"], size=120)
    x = rng.normal(size=(120, 5))
    onehot = (labels[:, None] == np.array(classes)[None]).astype(float)
    m = Moments(classes=classes)
    m.update(x[:50], labels[:50]).update(x[50:51], labels[50:51])  # a one-class shard
    other = Moments(classes=classes).update(x[51:], labels[51:])
    m.merge(other)
    check_moments(m, x, onehot)
    close(m.y_mean * m.n, onehot.sum(0))
    assert m.task == "classification" and m.n_targets == 4


def test_three_workers_shipped_state_merges_to_the_single_pass(rng):
    x = [rng.normal(size=(300, d)) for d in (4, 9, 2)]  # layers of different widths
    y = rng.integers(0, 3, 300)
    whole = LayerMoments(classes=[0, 1, 2]).update(x, y)
    workers = []
    for rows in np.array_split(rng.permutation(300), 3):  # 3 "workers", each its own chunk
        part = LayerMoments(classes=[0, 1, 2])
        for batch in np.array_split(rows, 4):
            part.update([layer[batch] for layer in x], y[batch])
        workers.append(pickle.dumps(part.to_dict()))  # shipped between processes
    merged = LayerMoments.from_dict(pickle.loads(workers[0]))
    for blob in workers[1:]:
        merged.merge(LayerMoments.from_dict(pickle.loads(blob)))
    assert merged.widths == whole.widths == [4, 9, 2] and merged.n == 300
    for a, b, layer in zip(merged, whole, x):
        check_moments(a, layer, np.eye(3)[y])
        close(a.m2, b.m2)


def test_pickle_round_trip_and_state_independence(rng):
    x = torch.from_numpy(rng.normal(size=(40, 3, 5)))
    m = LayerMoments(task="regression").update(x[:20], rng.normal(size=20))
    copy = pickle.loads(pickle.dumps(m))
    state = m.to_dict()
    y2 = rng.normal(size=20)
    m.update(x[20:], y2)
    copy.update(x[20:], y2)
    for a, b in zip(m, copy):
        np.testing.assert_array_equal(a.m2, b.m2)
        np.testing.assert_array_equal(a.cross, b.cross)
    assert state["moments"][0]["n"] == 20  # the exported state did not follow the update
    assert LayerMoments.from_dict(state).n == 20


def test_xtx_and_covariance(rng):
    x = rng.normal(3.0, 1.0, size=(50, 4))
    m = Moments().update(x[:10]).update(x[10:])
    close(m.xtx(centered=False), x.T @ x)
    close(m.covariance(ddof=0), np.cov(x.T, ddof=0))


# ----------------------------------------------------------- bad input
def test_bad_batches_raise_and_change_nothing(rng):
    x = rng.normal(size=(30, 4))
    m = Moments(classes=[0, 1]).update(x, rng.integers(0, 2, 30))
    before = m.to_dict()
    nan = x.copy()
    nan[3, 1] = np.nan
    inf = x.copy()
    inf[0, 0] = np.inf
    cases = [
        ((rng.normal(size=(5, 3)), [0, 1, 0, 1, 0]), "3 features but earlier batches had 4"),
        ((nan, rng.integers(0, 2, 30)), "1 NaN/Inf"),
        ((inf, rng.integers(0, 2, 30)), "1 NaN/Inf"),
        ((np.zeros((0, 4)), []), "empty batch"),
        ((x[:3], [0, 1, 2]), r"label\(s\) \[2\] are not in the class list \[0, 1\]"),
        ((x[:3], None), "every batch needs y"),
        ((x[:3], [0, 1]), "one row per row of x"),
        ((x[:, :, None], [0] * 30), r"shape \(n, dim\)"),
        ((x * 1e120, [0] * 30), "overflow float64"),
    ]
    for (bx, by), message in cases:
        with pytest.raises(LOESError, match=message):
            m.update(bx, by)
    after = m.to_dict()
    assert after["n"] == before["n"]
    for k in ("shift", "mean_shifted", "m2", "y_shift", "y_mean_shifted", "y_ss", "cross"):
        np.testing.assert_array_equal(after[k], before[k])


def test_layer_moments_validate_every_layer_before_any_changes(rng):
    lm = LayerMoments(task="regression").update(rng.normal(size=(10, 3, 4)), rng.normal(size=10))
    bad = rng.normal(size=(10, 3, 4))
    bad[2, 2, 0] = np.nan  # only the last layer is bad
    m2 = [m.m2.copy() for m in lm]
    with pytest.raises(LOESError, match="layer 2 contains 1 NaN/Inf"):
        lm.update(bad, rng.normal(size=10))
    with pytest.raises(LOESError, match="2 target columns but earlier batches had 1"):
        lm.update(rng.normal(size=(10, 3, 4)), rng.normal(size=(10, 2)))
    with pytest.raises(LOESError, match="this batch has 2 layers but earlier batches had 3"):
        lm.update(rng.normal(size=(10, 2, 4)), rng.normal(size=10))
    with pytest.raises(LOESError, match=r"x\[:, None, :\]"):
        lm.update(rng.normal(size=(10, 4)), rng.normal(size=10))
    assert lm.n == 10 and all(np.array_equal(a.m2, b) for a, b in zip(lm, m2))


def test_settings_and_merge_errors(rng):
    x, y = rng.normal(size=(8, 3)), rng.integers(0, 2, 8)
    with pytest.raises(LOESError, match="class list up front"):
        Moments(task="classification")
    with pytest.raises(LOESError, match="at least 2 distinct labels"):
        Moments(classes=[1, 1])
    with pytest.raises(LOESError, match="built without targets"):
        Moments().update(x, y)
    a = Moments(classes=[0, 1]).update(x, y)
    with pytest.raises(LOESError, match="same task and the same class list"):
        a.merge(Moments(classes=[0, 1, 2]).update(x, y))
    with pytest.raises(LOESError, match="5 features into moments with 3"):
        a.merge(Moments(classes=[0, 1]).update(rng.normal(size=(8, 5)), y))
    la = LayerMoments(classes=[0, 1]).update([x, x[:, :2]], y)
    with pytest.raises(LOESError, match="layer 1: cannot merge moments with 3 features"):
        la.merge(LayerMoments(classes=[0, 1]).update([x, x], y))
    with pytest.raises(LOESError, match="same settings"):
        la + LayerMoments(classes=["no", "yes"])
    assert a.n == 8 and la.n == 8


# ------------------------------------------------------------- ridge
@pytest.mark.parametrize("shape", [(80, 6), (30, 45)])  # N > D and N < D
def test_moment_ridge_equals_the_row_ridge(rng, shape):
    x = rng.normal(size=shape) * np.exp(rng.normal(size=shape[1]))
    y = x[:, :2] @ rng.normal(size=(2, 3)) + rng.normal(size=(shape[0], 3))
    m = Moments(task="regression")
    for s in shards(shape[0], rng, 4):
        m.update(x[s], y[s])
    ridge, path = MomentRidge(m), RidgePath(torch.from_numpy(x), torch.from_numpy(y))
    for a in (1e-3, 0.1, 10.0):
        w, b = ridge.coef(a)
        w_ref, b_ref = path.coef(a)
        close(w, w_ref.numpy(), rtol=1e-8)
        close(b, b_ref.numpy(), rtol=1e-8)
        assert ridge.gcv(a) == pytest.approx(float((path.gcv_residuals(a) ** 2).sum()), rel=1e-8)
        assert m.residual_ss(w, b) == pytest.approx(((y - x @ w - b) ** 2).sum(), rel=1e-8)
    for got, ref in zip(ridge_gcv_fit_moments(m), ridge_gcv_fit(x, y)):
        close(got, ref, rtol=1e-8)


# ------------------------------------------------------- streaming sweep
def planted_classification(rng, n=360):
    y = rng.integers(0, 4, n)
    x = rng.normal(size=(n, 5, 8))
    x[:, 3, :4] += 2.0 * np.eye(4)[y]
    x[:, 1, :4] += 0.5 * np.eye(4)[y]
    return x, y


def fold_batches(x, y, cv, labels=None):
    """One batch per in-memory fold, in fold order: shard fold i = sample fold i."""
    return [(x[held], y[held]) for _, held in kfold(len(x), cv, 0, labels)]


def test_streaming_sweep_equals_in_memory_classification(rng):
    x, y = planted_classification(rng)
    memory = LayerSweep(cv=4, show_progress=False).fit(x, y)
    batches = fold_batches(x, y, 4, y)
    stream = sweep_layers_streaming(
        lambda: iter(batches), classes=[0, 1, 2, 3], cv=4, show_progress=False
    )
    assert stream.best_layer() == memory.best_layer() == 3 and stream.validation_ == "shard_cv"
    np.testing.assert_array_equal(stream.fold_alphas_, memory.fold_alphas_)
    np.testing.assert_allclose(stream.fold_scores_, memory.fold_scores_, atol=1e-6)
    assert stream.baseline_ == pytest.approx(memory.baseline_)
    for (w, b), (w_ref, b_ref) in zip(stream.coefs_, memory.coefs_):
        close(w, w_ref, rtol=1e-8)
        close(b, b_ref, rtol=1e-8)
    np.testing.assert_array_equal(stream.predict(x), memory.predict(x))


def test_streaming_sweep_equals_in_memory_regression(rng):
    x = rng.normal(size=(300, 4, 6)) + 50.0
    y = (x[:, 2, :2] - 50.0).sum(1) + 0.3 * rng.normal(size=300) + 1e3
    memory = LayerSweep("regression", cv=5, layers=[0, 2, 3], show_progress=False).fit(x, y)
    batches = [(torch.from_numpy(bx), by) for bx, by in fold_batches(x, y, 5)]
    stream = LayerSweep("regression", cv=5, layers=[0, 2, 3], show_progress=False).fit_stream(
        batches
    )
    assert stream.layers_ == [0, 2, 3] and stream.best_layer() == 2
    np.testing.assert_array_equal(stream.fold_alphas_, memory.fold_alphas_)
    np.testing.assert_allclose(stream.fold_scores_, memory.fold_scores_, atol=1e-6)
    assert stream.scores_[1] > 0.9 and stream.to_dict()["validation"] == "shard_cv"


def test_streaming_sweep_on_held_out_batches(rng):
    x, y = planted_classification(rng, 400)
    train = [(x[i : i + 60], y[i : i + 60]) for i in range(0, 300, 60)]
    test = (b for b in [(x[300:350], y[300:350]), (x[350:], y[350:])])  # read once: fine
    sweep = sweep_layers_streaming(train, test, classes=[0, 1, 2, 3], show_progress=False)
    for row in range(5):  # the twin: GCV ridge on the training rows, accuracy on the test rows
        w, b, _ = ridge_gcv_fit(x[:300, row], np.eye(4)[y[:300]])
        acc = ((x[300:, row] @ w + b).argmax(1) == y[300:]).mean()
        assert sweep.fold_scores_[row, 0] == pytest.approx(acc, abs=1e-12)
    assert sweep.best_layer() == 3 and sweep.validation_ == "holdout"
    assert sweep.baseline_ == pytest.approx(np.bincount(y[300:]).max() / 100)

    yr = x[:, 3, 0] + 0.2 * rng.normal(size=400)
    reg = sweep_layers_streaming(
        [(x[:300], yr[:300])], [(x[300:], yr[300:])], task="regression", show_progress=False
    )
    w, b, _ = ridge_gcv_fit(x[:300, 3], yr[:300, None])
    pred = x[300:, 3] @ w[:, 0] + b[0]
    r2 = 1 - ((yr[300:] - pred) ** 2).sum() / ((yr[300:] - yr[300:].mean()) ** 2).sum()
    assert reg.scores_[3] == pytest.approx(r2, abs=1e-10) and reg.best_layer() == 3


def test_streaming_sweep_errors(rng):
    x, y = planted_classification(rng, 60)
    batches = fold_batches(x, y, 3, y)
    with pytest.raises(LOESError, match="cannot infer the task"):
        sweep_layers_streaming(batches)
    with pytest.raises(LOESError, match="one-shot iterator"):
        sweep_layers_streaming(iter(batches), classes=[0, 1, 2, 3], show_progress=False)
    with pytest.raises(LOESError, match="need at least 5 batches; got 3"):
        sweep_layers_streaming(batches, classes=[0, 1, 2, 3], show_progress=False)
    with pytest.raises(LOESError, match=r"label\(s\) \[3\] are not in the class list"):
        sweep_layers_streaming(batches, classes=[0, 1, 2], cv=3, show_progress=False)
    passes = iter([batches, batches[:2]])
    with pytest.raises(LOESError, match="second pass over the batches gave 2 batches, the first 3"):
        sweep_layers_streaming(
            lambda: next(passes), classes=[0, 1, 2, 3], cv=3, show_progress=False
        )
    with pytest.raises(LOESError, match="no targets"):
        sweep_layers_streaming([x], task="regression", show_progress=False)


# --------------------------------------------------- label-free metrics
@pytest.mark.parametrize("shape", [(240, 12), (40, 60)])  # N > D and N < D
def test_streaming_metrics_equal_the_in_memory_functions(rng, shape):
    n, d = shape
    layers = [
        rng.normal(size=shape) + 3.0,  # offset: raw and centred metrics differ
        rng.normal(size=shape) * np.exp(rng.normal(size=d)),
        rng.normal(size=(n, 3)) @ rng.normal(size=(3, d)),  # rank 3
    ]
    batches = [[layer[s] for layer in layers] for s in shards(n, rng, 5)]
    prof = streaming_profile(iter(batches), show_progress=False)
    merged = LayerMoments().consume(batches[:2]) + LayerMoments().consume(batches[2:])
    ref = profile(layers, metrics=list(prof.values), with_cka=False, show_progress=False)
    for name, values in prof.values.items():
        np.testing.assert_allclose(values, ref.values[name], rtol=1e-8, atol=1e-8)
    for layer, m in zip(layers, merged):
        for alpha in (0.5, 1.0, 2.0):
            got = covariance_metrics(m, alpha=alpha)
            assert got["dataset_entropy"] == pytest.approx(dataset_entropy(layer, alpha), abs=1e-8)
        assert got["effective_rank"] == pytest.approx(effective_rank(layer, center=True), abs=1e-8)
        assert got["rankme"] == pytest.approx(rankme(layer), abs=1e-8)
        assert got["isotropy"] == pytest.approx(isotropy(layer), abs=1e-8)
    assert prof.ranking("effective_rank")[-1] == 2 and prof.config["n_samples"] == n


def test_streaming_metrics_errors(rng):
    with pytest.raises(LOESError, match=r"need the samples themselves"):
        streaming_profile([rng.normal(size=(5, 2, 3))], metrics=["twonn"])
    with pytest.raises(LOESError, match="no rows"):
        streaming_profile(LayerMoments())
    with pytest.raises(LOESError, match="no rows"):
        covariance_metrics(Moments())


def test_stream_items_pairs_and_layer_lists(rng):
    x = rng.normal(size=(20, 2, 3))
    layers = [x[:, 0], x[:, 1]]
    as_pair = LayerMoments().consume([(x, rng.integers(0, 2, 20))])  # label-free: y ignored
    as_list = LayerMoments().consume([layers])  # two 2-D arrays: two layers, not (x, y)
    as_list_pair = LayerMoments(task="regression").consume([(layers, rng.normal(size=20))])
    for lm in (as_pair, as_list, as_list_pair):
        assert lm.n == 20 and lm.widths == [3, 3]
        close(lm[1].mean, x[:, 1].mean(0))


def test_affine_moments_equal_the_moments_of_transformed_rows():

    rng = np.random.default_rng(5)
    x, y = rng.normal(3.0, 2.0, size=(200, 6)), rng.normal(size=(200, 2))
    scale, offset = rng.uniform(0.1, 4.0, size=6), rng.normal(size=6)
    got = Moments(task="regression").update(x[:70], y[:70]).update(x[70:], y[70:])
    got = got.affine(scale, offset)
    want = Moments(task="regression").update((x - offset) * scale, y)
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.m2, want.m2, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got.cross, want.cross, rtol=1e-10, atol=1e-10)
    with pytest.raises(LOESError, match=r"must have shape \(6,\)"):
        got.affine(np.ones(5))
