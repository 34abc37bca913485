"""The calibration estimate (loes.core._estimate) against explicit K-fold refits."""

import json
import math

import numpy as np
import pytest
import torch

from loes import LOESError, LOESResult, select_layers_from_custom_embeddings
from loes._estimate import (
    CrossValidation,
    Estimate,
    _fold_predictions,
    _standardized,
    cv_estimate,
    standard_sets,
)
from loes._linalg import RidgePath
from loes._splits import kfold
from loes.cli import main
from loes.core import select as core_select


def _planted(n=240, layers=5, dim=12, signal=(2,), strength=1.5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    xs = [torch.randn(n, dim, generator=g, dtype=torch.float64) for _ in range(layers)]
    for i in signal:
        xs[i][:, :classes] += strength * torch.nn.functional.one_hot(y, classes)
    return xs, y, torch.nn.functional.one_hot(y, classes).double()


def _explicit(kernel, y, folds, reg, dim):
    """Refit on every training part with the same augmented kernel and λ: the slow twin."""
    n = kernel.shape[0]
    scale = float(torch.diagonal(kernel).mean())
    lam = reg * float(torch.diagonal(kernel).sum()) / min(n - 1, dim)
    aug = kernel + 1e3 * scale
    out = []
    for held in folds:
        train = torch.as_tensor(np.setdiff1d(np.arange(n), held.numpy()))
        a = aug[train][:, train] + lam * torch.eye(len(train), dtype=torch.float64)
        alpha = torch.linalg.solve(a, y[train])
        out.append(aug[held][:, train] @ alpha)
    return out


def test_block_identity_equals_refits():
    xs, _, y1h = _planted()
    z = torch.cat([_standardized(xs[i]) for i in (1, 2)], 1)
    kernel = z @ z.T
    folds = [torch.as_tensor(h) for _, h in kfold(len(y1h), 5, 3)]
    fast = _fold_predictions(kernel, y1h, folds, [1.0], 24)
    slow = _explicit(kernel, y1h, folds, 1.0, 24)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_intercept_is_effectively_unpenalised():
    """The constant feature's shrinkage is negligible: predictions match ridge with a free intercept."""
    xs, _, y1h = _planted()
    z = _standardized(xs[2])
    folds = [torch.as_tensor(h) for _, h in kfold(len(y1h), 4, 0)]
    fast = _fold_predictions(z @ z.T, y1h, folds, [1.0], z.shape[1])
    n = len(y1h)
    lam = 1.0 * float((z * z).sum()) / min(n - 1, z.shape[1])
    for held, pred in zip(folds, fast):
        train = torch.as_tensor(np.setdiff1d(np.arange(n), held.numpy()))
        path = RidgePath(z[train], y1h[train], relative=False)
        torch.testing.assert_close(pred, path.predict(lam, z[held]), rtol=1e-4, atol=1e-4)


def test_scores_match_an_explicit_loop():
    xs, y, y1h = _planted()
    sets = standard_sets([2, 0], len(xs))
    est = cv_estimate(xs, y1h, "classification", sets, n_splits=4, n_repeats=2, random_state=5)
    rng = np.random.default_rng(5)
    parts = [kfold(len(y), 4, int(rng.integers(2**31)), y.numpy()) for _ in range(2)]
    folds = [torch.as_tensor(h) for p in parts for _, h in p]
    for name, idx in sets.items():
        z = torch.cat([_standardized(xs[i]) for i in idx], 1)
        by_reg = {reg: _explicit(z @ z.T, y1h, folds, reg, z.shape[1]) for reg in (1e-2, 1e-1, 1.0)}
        preds = min(
            by_reg.values(),
            key=lambda ps: sum(float(((y1h[h] - p) ** 2).sum()) for p, h in zip(ps, folds)),
        )
        accs = [float((p.argmax(1) == y[h]).double().mean()) for p, h in zip(preds, folds)]
        assert est.mean[name] == pytest.approx(np.mean(accs), abs=1e-12)
        assert est.se[name] == pytest.approx(np.std(accs, ddof=1) / 2.0, abs=1e-12)


@pytest.mark.parametrize("strength,dim", [(0.5, 100), (1.5, 12), (4.0, 4)])
def test_strength_search_equals_trying_every_strength(strength, dim):
    """The search from the strongest down (stopping at the first worse) finds the
    exhaustive minimum; the three cases are won by 1, 0.1 and 0.01 in turn."""
    xs, _, y1h = _planted(strength=strength, dim=dim)
    z = _standardized(xs[2])
    folds = [torch.as_tensor(h) for _, h in kfold(len(y1h), 5, 3)]
    by_reg = {reg: _explicit(z @ z.T, y1h, folds, reg, dim) for reg in (1e-2, 1e-1, 1.0)}
    sse = {
        reg: sum(float(((y1h[h] - p) ** 2).sum()) for p, h in zip(ps, folds))
        for reg, ps in by_reg.items()
    }
    best = min(sse, key=sse.get)
    assert best == {0.5: 1.0, 1.5: 1e-1, 4.0: 1e-2}[strength]
    fast = _fold_predictions(z @ z.T, y1h, folds, (1e-2, 1e-1, 1.0), dim)
    for a, b in zip(fast, by_reg[best]):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_float32_features_score_as_float64():
    """float32 features get float32 kernels (float64 solves): the fold scores match the
    float64 computation within one row of a fold (a near-tie may flip), the means within 0.002."""
    xs, _, y1h = _planted(n=300, dim=40, strength=1.0)
    sets = standard_sets([2, 0], len(xs))
    exact = CrossValidation(xs, y1h, "classification")
    single = CrossValidation([x.float() for x in xs], y1h, "classification")
    for layers in sets.values():
        a, b = exact.fold_scores(layers), single.fold_scores(layers)
        assert np.abs(a - b).max() <= 1 / 60 + 1e-12
        assert abs(a.mean() - b.mean()) <= 0.002


def test_planted_layer_wins_and_verdicts_say_so():
    xs, y, y1h = _planted(signal=(1,))
    est = cv_estimate(xs, y1h, "classification", standard_sets([1], len(xs)))
    assert est.mean["selected"] > est.mean["last"] + 0.2
    assert est.diff["last"] > 2 * est.diff_se["last"]
    assert "better than the last layer" in est.verdict("last")
    xs4, _, _ = _planted(signal=(4,))
    same = cv_estimate(xs4, y1h, "classification", {"selected": [4], "last": [4]})
    assert same.verdict().endswith("the pick is the last layer")


def test_noise_only_is_at_chance():
    xs, y, y1h = _planted(signal=())
    est = cv_estimate(xs, y1h, "classification", standard_sets([0, 1], len(xs)))
    assert est.chance == pytest.approx(1 / 3, abs=0.01)
    assert abs(est.mean["selected"] - est.chance) < 3 * est.se["selected"] + 0.02


def test_regression_r2():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(200, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    t = xs[0] @ torch.arange(1.0, 7.0, dtype=torch.float64) + 0.1 * torch.randn(
        200, generator=g, dtype=torch.float64
    )
    est = cv_estimate(xs, t[:, None], "regression", standard_sets([0], 3))
    assert est.metric == "r2"
    assert est.mean["selected"] > 0.9 and est.mean["last"] < 0.1


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"task": "label_free"}, "an estimate needs targets"),
        ({"n": 6}, "at least 2 rows of every class"),
    ],
)
def test_bad_estimate_inputs(kwargs, message):
    n = kwargs.get("n", 60)
    xs, y, y1h = _planted(n=n, classes=4 if n == 6 else 3)
    with pytest.raises(LOESError, match=message):
        cv_estimate(xs, y1h, kwargs.get("task", "classification"), {"selected": [0]})


def test_dict_round_trip():
    xs, _, y1h = _planted()
    est = cv_estimate(xs, y1h, "classification", standard_sets([1, 2], len(xs)))
    back = type(est).from_dict(est.to_dict())
    assert back == est and not math.isnan(back.mean["all"])


def test_noise_only_verdict_says_no_signal():
    xs, y, y1h = _planted(signal=())
    est = cv_estimate(xs, y1h, "classification", standard_sets([0, 1], len(xs)))
    assert "no better than the majority class (0.333)" in est.verdict()


# ------------------------------------------------------------- held-out rows for the estimate
def _rows(n, seed, labels=("a", "b", "c")):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % len(labels)
    x = torch.randn(n, 5, 16, generator=g)
    x[:, 2, :3] += 2 * torch.nn.functional.one_hot(y, 3)
    return x, np.array(labels)[y.numpy()]


def test_eval_rows_are_cross_validated_on_their_own():
    """The estimate with eval rows is the CV of those rows alone, in the calibration's classes."""
    x, y = _rows(200, 0)
    xe, ye = _rows(150, 1, labels=("b", "c", "a"))  # same classes, other order of appearance
    res = select_layers_from_custom_embeddings(
        x, y, k=2, show_progress=False, eval_embeddings=xe, eval_targets=ye
    )
    est = res.estimate
    assert est.rows == "eval" and est.n_samples == 150
    ids = torch.as_tensor(np.searchsorted(["a", "b", "c"], ye))
    direct = cv_estimate(
        [xe[:, i] for i in range(5)],
        torch.nn.functional.one_hot(ids, 3).double(),
        "classification",
        standard_sets(res.selected_layers, 5),
        labels=ids,
        random_state=res.config["seed"],
    )
    assert est.mean == direct.mean and est.diff == direct.diff
    cal = select_layers_from_custom_embeddings(x, y, k=2, show_progress=False).estimate
    assert cal.rows == "calibration" and cal.mean != est.mean
    assert "the 150 held-out rows you passed, 5-fold CV x 3" in res.summary()
    assert "verdict (held-out rows): layers [2" in res.summary()
    assert (
        "the 200 calibration rows, 5-fold CV x 3"
        in select_layers_from_custom_embeddings(x, y, k=2, show_progress=False).summary()
    )
    back = LOESResult.from_json(res.to_json())
    assert back.estimate == est and back.estimate.rows == "eval"
    old = {k: v for k, v in cal.to_dict().items() if k != "rows"}  # JSON written before `rows`
    assert Estimate.from_dict(old).rows == "calibration"


def test_eval_rows_for_regression():
    g = torch.Generator().manual_seed(2)
    x, xe = torch.randn(120, 3, 6, generator=g), torch.randn(80, 3, 6, generator=g)
    w = torch.arange(1.0, 7.0)
    res = select_layers_from_custom_embeddings(
        x,
        x[:, 0] @ w,
        k=1,
        task="regression",
        show_progress=False,
        eval_embeddings=xe,
        eval_targets=xe[:, 0] @ w,
    )
    assert res.estimate.rows == "eval" and res.estimate.mean["selected"] > 0.95
    with pytest.raises(
        LOESError, match="eval_targets has 2 target columns, the calibration targets 1"
    ):
        select_layers_from_custom_embeddings(
            x,
            x[:, 0] @ w,
            k=1,
            task="regression",
            show_progress=False,
            eval_embeddings=xe,
            eval_targets=torch.stack([xe[:, 0] @ w] * 2, 1),
        )


def _bad_eval():
    xe, ye = _rows(60, 1)
    return [
        ({"eval_embeddings": xe}, "eval_embeddings was given without eval_targets"),
        ({"eval_targets": ye}, "eval_targets was given without eval_embeddings"),
        (
            {"eval_embeddings": xe[:, :4], "eval_targets": ye},
            "eval_embeddings has 4 layers, the calibration",
        ),
        (
            {"eval_embeddings": xe[:, :, :8], "eval_targets": ye},
            "layer 0 has width 8, the calibration layer 16",
        ),
        (
            {"eval_embeddings": xe, "eval_targets": np.where(ye == "a", "z", ye)},
            r"eval_targets has 1 label\(s\) the calibration targets do not have \(\['z'\]",
        ),
        (
            {"eval_embeddings": xe[:4], "eval_targets": ye[:4]},
            "the eval rows cannot be cross-validated: an estimate needs at least 2 rows of every class",
        ),
        (
            {"eval_embeddings": xe * float("nan"), "eval_targets": ye},
            "eval_embeddings: embeddings contain",
        ),
        (
            {"eval_embeddings": xe, "eval_targets": ye[:50]},
            "eval_targets: targets must have one row per sample",
        ),
        (
            {"eval_embeddings": xe, "eval_targets": ye, "estimate": False},
            "estimate=False turns it off",
        ),
        (
            {"eval_embeddings": xe, "eval_targets": ye, "task": "label_free"},
            "task='label_free' has none",
        ),
    ]


@pytest.mark.parametrize("kwargs,message", _bad_eval())
def test_bad_eval_rows_fail_before_the_selection(kwargs, message, monkeypatch):
    def no_engine(*args, **kw):
        raise AssertionError("the selection ran before the eval rows were checked")

    monkeypatch.setattr(core_select, "run_robust", no_engine)
    x, y = _rows(200, 0)
    with pytest.raises(LOESError, match=message):
        select_layers_from_custom_embeddings(x, y, k=2, show_progress=False, **kwargs)


def test_eval_rows_on_the_command_line(tmp_path, capsys):
    x, y = _rows(200, 0)
    xe, ye = _rows(150, 1)
    np.savez(tmp_path / "cal.npz", embeddings=x.numpy(), targets=y)
    np.savez(tmp_path / "held.npz", embeddings=xe.numpy(), targets=ye)
    np.save(tmp_path / "held.npy", xe.numpy())
    (tmp_path / "held.txt").write_text("\n".join(ye))
    api = select_layers_from_custom_embeddings(
        x, y, k=2, show_progress=False, eval_embeddings=xe, eval_targets=ye
    )
    for extra in (["held.npz"], ["held.npy", "--eval-targets", str(tmp_path / "held.txt")]):
        argv = ["select", "--embeddings", str(tmp_path / "cal.npz"), "--k", "2", "--json"]
        argv += ["--eval-embeddings", str(tmp_path / extra[0]), *extra[1:]]
        assert main(argv) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["estimate"]["rows"] == "eval"
        assert printed["estimate"]["mean"] == pytest.approx(api.estimate.mean, abs=1e-12)
    argv = ["select", "--embeddings", str(tmp_path / "cal.npz"), "--k", "2"]
    assert main(argv + ["--eval-targets", str(tmp_path / "held.txt")]) == 2
    assert "--eval-targets needs --eval-embeddings" in capsys.readouterr().err
    assert main(argv + ["--eval-embeddings", str(tmp_path / "held.npy")]) == 2
    assert "holds no targets: pass --eval-targets" in capsys.readouterr().err
