"""k="auto": the number of layers chosen from the calibration data (issue 11)."""

import numpy as np
import pytest

from loes import LOESError, select_layers_from_custom_embeddings


def _layers(n=400, n_layers=8, dim=24, seed=0):
    g = np.random.default_rng(seed)
    return g.normal(size=(n, n_layers, dim)), g


def _select(x, y, **kw):
    return select_layers_from_custom_embeddings(x, y, k="auto", show_progress=False, **kw)


def test_one_informative_last_layer_gives_the_last_layer_alone():
    x, g = _layers()
    y = np.arange(len(x)) % 4
    x[:, -1, :4] += 2.0 * np.eye(4)[y]
    res = _select(x, y)
    assert res.selected_layers == [7]
    assert res.config["k_auto"]["chosen"] == "last"
    assert res.estimate.verdict().endswith("the pick is the last layer")


def test_one_informative_middle_layer_gives_that_layer():
    x, g = _layers()
    y = np.arange(len(x)) % 4
    x[:, 3, :4] += 2.0 * np.eye(4)[y]
    res = _select(x, y)
    assert res.selected_layers == [3]
    assert "better than the last layer" in res.estimate.verdict()


def test_two_complementary_layers_give_both():
    """Layer 2 tells classes {0,1} from {2,3}, layer 5 {0,2} from {1,3}: each alone is
    half right, together they decide all four classes."""
    x, g = _layers()
    y = np.arange(len(x)) % 4
    x[:, 2, 0] += 2.5 * np.where(y < 2, 1.0, -1.0)
    x[:, 5, 0] += 2.5 * np.where(y % 2 == 0, 1.0, -1.0)
    res = _select(x, y)
    assert sorted(res.selected_layers) == [2, 5]
    assert res.estimate.mean["selected"] > res.estimate.mean["last"] + 0.2


def test_noise_only_estimate_says_no_layer_beats_the_majority_class():
    x, g = _layers()
    y = np.arange(len(x)) % 3
    with pytest.warns(UserWarning):
        res = _select(x, y)
    assert "no better than the majority class" in res.estimate.verdict()
    assert res.selected_layers == [7]  # no cut carries signal: the last layer


def test_regression_auto_and_r2_estimate():
    x, g = _layers()
    t = x[:, 1, :3] @ np.array([1.0, -2.0, 0.5]) + 0.1 * g.normal(size=len(x))
    res = _select(x, t, task="regression")
    assert res.selected_layers == [1]
    assert res.estimate.metric == "r2" and res.estimate.mean["selected"] > 0.9


def test_auto_needs_targets_and_a_fixed_k_still_works():
    x, _ = _layers(n=60)
    with pytest.raises(LOESError, match="k='auto' chooses the number of layers"):
        select_layers_from_custom_embeddings(x, None, k="auto", task="label_free")
    with pytest.raises(LOESError, match="k must be an integer"):
        select_layers_from_custom_embeddings(x, np.arange(60) % 2, k="three")
    fixed = select_layers_from_custom_embeddings(
        x, np.arange(60) % 2, k=3, show_progress=False, estimate=False
    )
    assert len(fixed.selected_layers) == 3 and fixed.estimate is None


def test_auto_layer_spec_keeps_only_the_layers_that_carry_the_signal():
    """Two of twelve layers carry the labels: the group lasso alone keeps many more,
    the "auto" spec cuts its order with the cross-validated probe."""
    from loes.layers import GroupLassoLayers, resolve_layers

    x, g = _layers(n=300, n_layers=12, dim=16, seed=2)
    y = np.arange(len(x)) % 4
    x[:, 3, 0] += 2.5 * np.where(y < 2, 1.0, -1.0)
    x[:, 8, 0] += 2.5 * np.where(y % 2 == 0, 1.0, -1.0)
    lasso = GroupLassoLayers(task="classification").fit(x, y).selected_layers_
    chosen = resolve_layers("auto", 12, embeddings=x, targets=y)
    assert sorted(chosen) == [3, 8]
    assert len(lasso) >= len(chosen)


def test_choice_is_the_largest_cut_within_one_se_of_explicit_refit_errors():
    """The rule recomputed from explicit K-fold refits (the slow twin of the block identity):
    every candidate's held-out squared error, and the largest one within tolerance wins."""
    import torch

    from loes._estimate import (
        CHOICE_SIGNAL,
        CHOICE_TOLERANCE,
        CrossValidation,
        _standardized,
        choose_layers,
    )

    x, g = _layers(n=200, n_layers=6, dim=10, seed=2)
    y = np.arange(len(x)) % 3
    for layer, strength in ((1, 1.0), (3, 0.5), (4, 0.3)):
        x[:, layer, :3] += strength * np.eye(3)[y]
    layers = [torch.as_tensor(x[:, i]) for i in range(6)]
    y1h = torch.nn.functional.one_hot(torch.as_tensor(y)).double()
    cv = CrossValidation(layers, y1h, "classification", n_splits=4, n_repeats=2, random_state=1)
    chosen, record = choose_layers(cv, [1, 3, 4, 0, 2, 5], last=5)

    def explicit_errors(idx):
        z = torch.cat([_standardized(layers[i]) for i in idx], 1)
        kernel = z @ z.T
        n, scale = len(y), float(torch.diagonal(kernel).mean())
        per_reg = []
        for reg in cv.regs:
            lam = reg * float(torch.diagonal(kernel).sum()) / min(n - 1, z.shape[1])
            errs = []
            for held in cv.folds:
                train = torch.as_tensor(np.setdiff1d(np.arange(n), held.numpy()))
                a = kernel[train][:, train] + 1e3 * scale + lam * torch.eye(len(train))
                pred = (kernel[held][:, train] + 1e3 * scale) @ torch.linalg.solve(a, y1h[train])
                errs.append(float(((y1h[held] - pred) ** 2).sum(1).mean()))
            per_reg.append(errs)
        return np.array(min(per_reg, key=lambda e: np.sum(e)))  # equal fold sizes here

    errors = {row["name"]: explicit_errors(row["layers"]) for row in record["candidates"]}
    best = min(errors, key=lambda name: errors[name].mean())
    assert record["best"] == best
    null = np.array(
        [
            float(
                ((y1h[h].numpy() - np.delete(y1h.numpy(), h.numpy(), 0).mean(0)) ** 2).sum(1).mean()
            )
            for h in cv.folds
        ]
    )
    se = lambda d: d.std(ddof=1) / np.sqrt(cv.n_splits)  # noqa: E731
    eligible = []
    for row in record["candidates"]:
        err = errors[row["name"]]
        assert row["error"] == pytest.approx(err.mean(), rel=1e-6)
        gap, gain = err - errors[best], null - err
        if gap.mean() <= CHOICE_TOLERANCE * se(gap) and gain.mean() > CHOICE_SIGNAL * se(gain):
            eligible.append(row)
    expected = max(eligible, key=lambda row: (len(row["layers"]), row["name"] == "last"))
    assert record["chosen"] == expected["name"] and chosen == expected["layers"]
    assert record["chosen"] != best  # a larger cut within one SE beat the best
