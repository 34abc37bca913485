"""The selection engine: planted layers, invariances, determinism, presets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import planted, run_python
from published_loes import published_loes

from loes import LOESResult, LOESWarning, select_layers_from_custom_embeddings
from loes.core.select import DEFAULTS


def select(x, y, k=2, **kw):
    kw.setdefault("show_progress", False)
    return select_layers_from_custom_embeddings(x, y, k=k, **kw)


# ------------------------------------------------------------------ planted data
@pytest.mark.parametrize("n,d", [(120, 256), (600, 64)])  # N < D and N > D
@pytest.mark.parametrize("seed", [0, 1])
def test_robust_finds_planted_layers_among_noise_dead_duplicated_rescaled(n, d, seed):
    x, y = planted(
        n,
        d,
        informative=(6, 2),
        dead=(0,),
        duplicate_of={9: 6},
        rescale={2: 1e3, 4: 1e-3},
        seed=seed,
    )
    res = select(x, y, k=2)
    assert res.selected_layers == [6, 2]
    assert res.excluded_layers == [0]
    # the duplicate of the first pick is recognised as fully redundant at step 2
    assert res.steps[1].row(9)["redundancy"] > 0.99


@pytest.mark.parametrize("n,d", [(120, 256), (600, 64)])
def test_reference_preset_is_fooled_where_robust_is_not(n, d):
    x, y = planted(n, d, informative=(6, 2), dead=(0,), seed=0)
    ref = select(x, y, k=1, preset="reference")
    rob = select(x, y, k=1)
    assert rob.selected_layers == [6]
    assert ref.selected_layers != [6]  # isotropy of noise or of the dead layer outweighs the fit


def test_regression_planted_layer_found_at_n_below_d():
    x, y = planted(80, 200, informative=(3,), regression=True, seed=2)
    res = select(x, y, k=1, task="regression")
    assert res.selected_layers == [3]
    assert (
        res.steps[0].row(3)["fit"]
        < 0.5
        < min(v for l, v in zip(res.steps[0].candidates, res.steps[0].terms["fit"]) if l != 3)
    )


def test_labels_matter_supervised_differs_from_label_free():
    x, y = planted(150, 300, informative=(5,), seed=4)
    sup = select(x, y, k=1)
    free = select(x, None, k=1, task="label_free")
    assert sup.selected_layers == [5]
    assert free.selected_layers != sup.selected_layers


def test_fit_term_is_out_of_sample_when_n_below_d():
    # pure noise: an in-sample ridge interpolates (loss ~ 0); the LOO fit does not
    g = np.random.default_rng(0)
    x = g.normal(size=(60, 3, 500)).astype(np.float32)
    y = g.integers(0, 3, 60)
    res = select(x, y, k=1)
    assert min(res.steps[0].terms["fit"]) > 0.9
    ref = select(x, y, k=1, preset="reference")
    assert max(ref.steps[0].terms["fit"]) < 1e-3


# -------------------------------------------------------------------- invariances
def _planted_small(seed=0):
    return planted(200, 48, informative=(4, 1), seed=seed, n_layers=7)


def test_layer_scale_invariance():
    x, y = _planted_small()
    base = select(x, y, k=3)
    scaled = x.copy()
    for layer, c in enumerate([1e-4, 3.0, 1e3, 0.5, 7.0, 1e5, 2e-2]):
        scaled[:, layer] *= c
    other = select(scaled, y, k=3)
    assert other.selected_layers == base.selected_layers
    for a, b in zip(base.steps, other.steps):
        np.testing.assert_allclose(a.terms["total"], b.terms["total"], rtol=1e-4, atol=1e-5)


def test_regression_target_scale_invariance():
    x, y = planted(200, 32, informative=(2,), regression=True, n_layers=5, seed=1)
    a = select(x, y, k=2, task="regression")
    b = select(x, 1e6 * y + 42.0, k=2, task="regression")
    assert a.selected_layers == b.selected_layers
    np.testing.assert_allclose(a.layer_scores, b.layer_scores, rtol=1e-5)


def test_sample_permutation_invariance():
    x, y = _planted_small(1)
    perm = np.random.default_rng(9).permutation(len(y))
    a, b = select(x, y, k=3), select(x[perm], y[perm], k=3)
    assert a.selected_layers == b.selected_layers
    np.testing.assert_allclose(a.layer_scores, b.layer_scores, rtol=1e-4, atol=1e-5)


def test_layer_permutation_permutes_selection():
    x, y = _planted_small(2)
    perm = np.array([3, 6, 0, 5, 1, 4, 2])  # new layer i is old layer perm[i]
    a, b = select(x, y, k=3), select(x[:, perm], y, k=3)
    inverse = {int(old): new for new, old in enumerate(perm)}
    assert b.selected_layers == [inverse[l] for l in a.selected_layers]


# ------------------------------------------------------------------ determinism
def test_deterministic_and_global_rng_untouched():
    x, y = planted(
        150, 40, n_classes=25, informative=(3,), n_layers=5, seed=3
    )  # > 20 classes: sampled triplets
    torch.manual_seed(0)
    np.random.seed(0)
    state_t, state_np = torch.get_rng_state(), np.random.get_state()[1].copy()
    a = select(x, y, k=3, random_state=7)
    b = select(x, y, k=3, random_state=7)
    assert torch.equal(torch.get_rng_state(), state_t)
    assert np.array_equal(np.random.get_state()[1], state_np)
    assert a.selected_layers == b.selected_layers
    assert [s.terms for s in a.steps] == [s.terms for s in b.steps]
    ref1 = select(x, y, k=3, preset="reference", random_state=5)
    ref2 = select(x, y, k=3, preset="reference", random_state=5)
    assert [s.terms for s in ref1.steps] == [s.terms for s in ref2.steps]
    assert torch.equal(torch.get_rng_state(), state_t)


# ------------------------------------------------------------------ step tables
def test_step_tables_hold_every_candidate_and_weighted_totals():
    x, y = _planted_small(4)
    res = select(x, y, k=3)
    w = DEFAULTS["robust"]
    for t, table in enumerate(res.steps, 1):
        assert table.step == t
        assert sorted(table.candidates) == sorted(set(range(7)) - set(res.selected_layers[: t - 1]))
        total = (
            np.array(table.terms["fit"])
            + w["alpha"] * np.array(table.terms["isotropy"])
            + w["gamma"] * np.array(table.terms["redundancy"])
            - w["eta"] * np.array(table.terms["geometry"])
        )
        np.testing.assert_allclose(table.terms["total"], total, rtol=1e-12, atol=1e-12)
        assert table.selected == table.candidates[int(np.argmin(table.terms["total"]))]
        assert res.layer_scores[t - 1] == pytest.approx(min(table.terms["total"]))
    assert all(v == 0 for v in res.steps[0].terms["redundancy"])
    # bounded terms
    for table in res.steps:
        assert all(0 <= v <= 1 for v in table.terms["isotropy"] + table.terms["redundancy"])


def test_weights_change_selection_through_published_keyword_names():
    x, y = planted(300, 32, informative=(3,), n_layers=5, seed=5, strength=0.3)
    q = np.linalg.qr(np.random.default_rng(1).normal(size=(32, 32)))[0]
    x[:, 1] = (x[:, 1] * np.linspace(0.01, 10, 32)) @ q  # strongly anisotropic, correlated features
    iso_only = select(x, y, k=1, alpha=1e3)
    assert iso_only.steps[0].row(1)["isotropy"] == max(iso_only.steps[0].terms["isotropy"])
    assert iso_only.selected_layers[0] != 1
    assert iso_only.config["alpha"] == 1e3
    beta = select(x, y, k=2, beta=0.7)
    assert beta.config["gamma"] == 0.7


# ---------------------------------------------------------------- the reference
@pytest.mark.parametrize("n,d", [(90, 12), (40, 24)])
def test_reference_preset_equals_published_transcription(n, d):
    x, y = planted(n, d, informative=(2,), n_layers=5, n_classes=5, seed=6, strength=0.8)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    expected_sel, expected_scores = published_loes(xt, yt, k=3, seed=11)
    res = select(x, y, k=3, preset="reference", random_state=11)
    assert res.selected_layers == expected_sel
    np.testing.assert_allclose(res.layer_scores, expected_scores, rtol=1e-6, atol=1e-8)


def test_reference_label_free_is_isotropy_then_redundancy():
    x, y = _planted_small(8)
    res = select(x, None, k=3, task="label_free", preset="reference")
    iso = res.steps[0].terms["isotropy"]
    assert res.selected_layers[0] == res.steps[0].candidates[int(np.argmin(iso))]
    assert all(v == 0 for v in res.steps[0].terms["fit"])


# ------------------------------------------------------------ inputs and outputs
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs_agree_with_float32(dtype):
    x, y = _planted_small(5)
    base = select(torch.from_numpy(x), y, k=2)
    other = select(torch.from_numpy(x).to(dtype), y, k=2)
    assert other.selected_layers == base.selected_layers
    np.testing.assert_allclose(other.layer_scores, base.layer_scores, rtol=0.05, atol=0.02)


def test_string_labels_and_one_hot_and_soft_targets_give_same_choice():
    x, y = _planted_small(6)
    names = np.array(["cat", "dog", "eel", "fox"])[y]
    a = select(x, y, k=2)
    b = select(x, names, k=2)
    c = select(x, np.eye(4)[y], k=2)
    assert a.selected_layers == b.selected_layers == c.selected_layers
    np.testing.assert_allclose(a.layer_scores, b.layer_scores, rtol=1e-6)
    soft = 0.8 * np.eye(4)[y] + 0.05
    assert select(x, soft, k=1).selected_layers[0] == a.selected_layers[0]


def test_heterogeneous_layer_widths():
    g = np.random.default_rng(0)
    y = np.arange(150) % 3
    layers = [g.normal(size=(150, d)).astype(np.float32) for d in (16, 64, 8, 128)]
    layers[2][:, :3] += 2.5 * np.eye(3)[y]
    res = select(layers, y, k=2)
    assert res.selected_layers[0] == 2
    with_torch = select([torch.from_numpy(a) for a in layers], y, k=2)
    assert with_torch.selected_layers == res.selected_layers


def test_json_round_trip(tmp_path):
    x, y = _planted_small(7)
    res = select(x, y, k=3, layer_names=[f"hidden_states[{i + 1}]" for i in range(7)])
    path = tmp_path / "r.json"
    res.to_json(str(path))
    back = LOESResult.from_json(str(path))
    assert back == res
    assert LOESResult.from_dict(res.to_dict()).steps[2].row(back.selected_layers[2]) == res.steps[
        2
    ].row(res.selected_layers[2])
    assert "hidden_states" in res.summary()


def test_verbose_prints_without_logging_configuration():
    # a fresh interpreter with no logging configured, as in a user's script
    code = (
        "import torch; from loes import select_layers_from_custom_embeddings as s; "
        "g = torch.Generator().manual_seed(0); x = torch.randn(60, 3, 8, generator=g); "
        "s(x, torch.arange(60) % 2, k=2, verbose=True, show_progress=False)"
    )
    out = run_python(code)
    assert "step 1: layer" in out.stderr and "selected layers" in out.stderr
    # a quiet run after a verbose one stays quiet
    both = (
        code
        + "; import sys; print('QUIET', file=sys.stderr); "
        + code.split("; ", 1)[1].replace("verbose=True", "verbose=False")
    )
    out = run_python(both)
    before, after = out.stderr.split("QUIET")
    assert "step 1" in before and "step 1" not in after


def test_progress_bars_on_request(caplog, monkeypatch):
    # off a terminal progress is a log line (issue 12.4); pytest's logging capture receives it
    import loes._progress

    monkeypatch.setattr(loes._progress, "LOG_INTERVAL_S", 0.0)
    x, y = _planted_small(8)
    with caplog.at_level("INFO", logger="loes.progress"):
        select(x, y, k=2, show_progress=True)
    assert "LOES" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    x, y = _planted_small(9)
    cpu = select(torch.from_numpy(x), y, k=3)
    gpu = select(torch.from_numpy(x).cuda(), y, k=3)
    assert gpu.selected_layers == cpu.selected_layers
    np.testing.assert_allclose(gpu.layer_scores, cpu.layer_scores, rtol=1e-3, atol=1e-4)


def test_standardize_makes_scores_invariant_to_per_feature_scale():
    x, y = _planted_small(10)
    col_scale = np.random.default_rng(0).uniform(0.01, 100, size=x.shape[2]).astype(np.float32)
    a = select(x, y, k=3, standardize=True)
    b = select(x * col_scale, y, k=3, standardize=True)
    assert a.selected_layers == b.selected_layers
    for s, t in zip(a.steps, b.steps):
        np.testing.assert_allclose(s.terms["fit"], t.terms["fit"], rtol=1e-3, atol=1e-4)
    assert a.config["standardize"] is True


def test_steps_where_nothing_explains_the_target_are_reported():
    x, y = planted(200, 32, informative=(2,), n_layers=6, seed=3)
    res = select(x, y, k=3)
    # after the informative layer, only noise is left: steps 2 and 3 explain nothing out of sample
    assert res.selected_layers[0] == 2
    for t in (2, 3):
        assert min(res.steps[t - 1].terms["fit"]) >= 1.0
    assert res.config["uninformative_steps"] == [2, 3]
    # a normal run with a surplus k is not "something wrong": recorded, not warned
    assert not any("out of sample" in w for w in res.warnings)
    signal = select(*planted(200, 32, informative=(2, 4), n_layers=6, seed=3), k=2)
    assert signal.config["uninformative_steps"] == []


def test_unrelated_targets_warn_at_step_one():
    x, _ = planted(200, 32, informative=(2,), n_layers=6, seed=3)
    y = np.random.default_rng(1).integers(0, 3, size=200)
    with pytest.warns(LOESWarning, match="no layer explains the targets out of sample"):
        res = select(x, y, k=2)
    assert res.config["uninformative_steps"][0] == 1


def test_removed_fallback_option_is_an_unknown_option():
    """fallback="marginal" was measured as no gain and removed."""
    x, y = _planted_small()
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['fallback'\] for preset='robust'"):
        select(x, y, k=2, fallback="marginal")


# ---------------------------------------------------------- GCV and exact LOO
@pytest.mark.parametrize("cv", ["gcv", "loo"])
@pytest.mark.parametrize("n,d", [(90, 200), (300, 40)])
def test_step1_fit_equals_the_plain_twin(cv, n, d):
    """The engine's first-step fit is the out-of-sample error fraction of the plain
    ridge twin on the standardised layer and standardised one-hot labels."""
    from loes.core import ridge_gcv_residuals, ridge_loo_residuals

    x, y = planted(n, d, informative=(3,), n_layers=5, seed=2)
    res = select(x.astype(np.float64), y, k=1, cv=cv)
    target = np.eye(4)[y]
    target = target - target.mean(0)
    twin = ridge_gcv_residuals if cv == "gcv" else ridge_loo_residuals
    for layer in range(5):
        feats = x[:, layer] / x[:, layer].std(0)
        e = twin(feats, target, reg=DEFAULTS["robust"]["reg"]).numpy()
        assert res.steps[0].row(layer)["fit"] == pytest.approx(
            float((e**2).sum() / (target**2).sum()), rel=1e-6
        )


@pytest.mark.parametrize("n,d", [(120, 256), (600, 64)])
def test_gcv_and_exact_loo_find_the_same_planted_layers(n, d):
    x, y = planted(n, d, informative=(6, 2), dead=(0,), duplicate_of={9: 6}, seed=3)
    gcv, loo = select(x, y, k=2, cv="gcv"), select(x, y, k=2, cv="loo")
    assert gcv.selected_layers == loo.selected_layers == [6, 2]
    assert gcv.config["cv"] == "gcv" and loo.config["cv"] == "loo"
    # both estimate the same out-of-sample error: close, not equal
    a, b = np.array(gcv.steps[0].terms["fit"]), np.array(loo.steps[0].terms["fit"])
    assert np.abs(a - b).max() < 0.05 and not np.allclose(a, b)


def test_unknown_cv_is_a_clear_error():
    x, y = _planted_small()
    with pytest.raises(ValueError, match="cv must be 'loo'"):
        select(x, y, cv="kfold")


# ------------------------------------------------------------- constant features
def test_constant_layer_of_nonzero_value_is_excluded():
    """A layer of 0.1s centres to rounding noise (±1 ulp), not to zeros: it must
    still count as constant, not be standardised into unit-variance noise."""
    x, y = _planted_small()
    x = x.astype(np.float32)
    x[:, 3] = 0.1
    with pytest.warns(LOESWarning, match=r"layer\(s\) \[3\] are constant"):
        res = select(x, y, k=2)
    assert res.excluded_layers == [3]
    assert 3 not in res.steps[0].candidates


def test_constant_features_do_not_count_towards_a_layer():
    from loes.core._robust import LayerFactor

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 50, generator=g)
    x[:, :10] = 3.7  # ten constant features in float32
    for dual in (False, True):
        f = LayerFactor(x, 1.0, torch.float32, dual=dual, standardize=True)
        assert f.tr == pytest.approx(
            40 * 300, rel=1e-4
        )  # 40 unit-variance features over 300 samples
        assert bool((f.scale[0, :10] == 0).all()) and bool((f.scale[0, 10:] > 0).all())


def test_unknown_options_are_named_with_the_presets_options():
    x, y = _planted_small()
    with pytest.raises(
        ValueError, match=r"unknown option\(s\) \['foo'\] for preset='robust'.*'cv'"
    ):
        select(x, y, foo=1)
    with pytest.raises(ValueError, match=r"\['cv'\] for preset='reference'"):
        select(x, y, preset="reference", cv="gcv")


@pytest.mark.parametrize("cv", ["gcv", "loo"])
@pytest.mark.parametrize("n,d", [(90, 200), (300, 40)])  # dual and primal forms
def test_step1_geometry_equals_the_plain_twin(cv, n, d):
    """Class geometry at step 1: the scale-free triangle term of the centroids of
    the standardised layer, as computed by the plain function."""
    from loes._linalg import triplets
    from loes.core import triangle_geometry

    x, y = planted(n, d, informative=(3,), n_layers=5, n_classes=6, seed=4)
    res = select(x.astype(np.float64), y, k=1, cv=cv)
    index = triplets(6)
    for layer in range(5):
        feats = torch.from_numpy(x[:, layer] / x[:, layer].std(0))
        cent = torch.stack([feats[torch.from_numpy(y == c)].mean(0) for c in range(6)])
        assert res.steps[0].row(layer)["geometry"] == pytest.approx(
            triangle_geometry(cent, index), rel=1e-8
        )


def test_constant_feature_test_equals_the_plain_twin():
    """The engine's rounding-level test against a per-feature loop in float64:
    a feature is constant when its spread is at most 10 eps of its mean's size."""
    from loes.core._robust import constant_features

    g = np.random.default_rng(0)
    x = g.normal(size=(200, 6)).astype(np.float32)
    x[:, 0] = 0.1  # constant, centres to rounding noise
    x[:, 1] += 1e5  # offset 1e5, unit spread: informative
    x[:, 2] = 0.0  # zeros
    x[:, 3] = np.float32(3.0) + np.float32(3.0) * np.finfo(np.float32).eps * g.integers(
        -1, 2, 200
    )  # ±1 ulp
    x[:, 4] *= 1e-30  # tiny but varying
    xt = torch.from_numpy(x)
    mean = xt.mean(0, keepdim=True)
    fast = constant_features(xt - mean, mean)[0].tolist()
    eps = np.finfo(np.float32).eps
    slow = [
        bool(
            np.std(x[:, j].astype(np.float64))
            <= 10 * eps * abs(np.mean(x[:, j].astype(np.float64)))
        )
        for j in range(6)
    ]
    assert fast == slow == [True, False, True, True, False, False]


@pytest.mark.parametrize("cv", ["gcv", "loo"])
@pytest.mark.parametrize("dual", [False, True])
@pytest.mark.parametrize("power", [-90, 90])
def test_power_of_two_rescale_of_extreme_layers_is_exact(cv, dual, power):
    """A float32 layer beyond 2**±16 is rescaled by a power of two: its factor gives the
    same isotropy and step-1 fit as the unscaled layer (the slow twin: no rescale)."""
    from loes.core._robust import LayerFactor, _gcv_residual, _loo_residual

    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 20, generator=g)
    y = torch.randn(60, 2, generator=g)
    y = y - y.mean(0)
    fit = _gcv_residual if cv == "gcv" else _loo_residual
    for standardize in (False, True):
        plain = LayerFactor(x, 1.0, torch.float32, dual=dual, standardize=standardize, cv=cv)
        big = LayerFactor(
            x * 2.0**power, 1.0, torch.float32, dual=dual, standardize=standardize, cv=cv
        )
        assert plain.unit == 1.0 and big.unit in (2.0 ** -(power + 2), 2.0 ** -(power + 3))
        assert big.iso == pytest.approx(plain.iso, rel=1e-6)
        a = fit(plain, y, y, None, torch.float32, want_xt=False).residual()
        b = fit(big, y, y, None, torch.float32, want_xt=False).residual()
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
