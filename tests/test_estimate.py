"""The calibration estimate (loes.core._estimate) against explicit K-fold refits."""

import math

import numpy as np
import pytest
import torch

from loes import LOESError
from loes._estimate import _fold_predictions, _standardized, cv_estimate, standard_sets
from loes._linalg import RidgePath
from loes._splits import kfold


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
