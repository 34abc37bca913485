"""profile(), the streaming token accumulator and the label-free selectors."""

import math

import numpy as np
import pytest
import torch

import loes.metrics as lm
from loes import LOESError, LOESResult, select_layers_from_custom_embeddings
from loes._linalg import isotropy
from loes.metrics import (
    METRICS,
    TokenMetricAccumulator,
    best_layer_by_metric,
    effective_rank,
    profile,
    select_layers_label_free,
)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def token_batches(rng, n_layers=3, dim=6):
    """Three batches with different lengths and left/right padding."""
    out = []
    for b, t in ((4, 5), (3, 9), (5, 7)):
        states = rng.normal(size=(b, n_layers, t, dim))
        mask = np.zeros((b, t), dtype=bool)
        for i in range(b):
            n = rng.integers(2, t + 1)
            mask[i, :n] = True if i % 2 else False
            if not i % 2:
                mask[i, t - n :] = True
        out.append((torch.from_numpy(states), torch.from_numpy(mask)))
    return out


def test_streaming_equals_one_shot(rng):
    batches = token_batches(rng)
    acc = TokenMetricAccumulator(alpha=2.0).consume(batches)
    got = acc.compute()
    for layer in range(3):
        pe, cu, pooled = [], [], []
        for states, mask in batches:
            z = states[:, layer]
            pe.append(lm.prompt_entropy(z, mask, alpha=2.0, reduction="none"))
            cu.append(lm.curvature(z, mask, reduction="none"))
            pooled.append(torch.stack([z[i][mask[i]].mean(0) for i in range(len(z))]))
        pe, cu = torch.cat(pe), torch.cat(cu)
        assert got["prompt_entropy"][layer] == pytest.approx(
            float(pe[~pe.isnan()].mean()), rel=1e-10
        )
        assert got["curvature"][layer] == pytest.approx(float(cu[~cu.isnan()].mean()), rel=1e-10)
        np.testing.assert_allclose(
            acc.pooled()[:, layer].numpy(), torch.cat(pooled).numpy(), rtol=1e-5, atol=1e-6
        )
    assert acc.n_samples == 12


def test_stream_item_formats_agree(rng):
    batches = token_batches(rng)
    as_dicts = [{"hidden_states": list(s.unbind(1)), "attention_mask": m} for s, m in batches]
    a = TokenMetricAccumulator().consume(batches).compute()
    b = TokenMetricAccumulator().consume(as_dicts).compute()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-12)
    acc = TokenMetricAccumulator()
    acc.update(*batches[0])
    with pytest.raises(LOESError, match="layers"):
        acc.update(batches[1][0][:, :2], batches[1][1])


def test_profile_matches_direct_calls(rng):
    x = rng.normal(size=(80, 3, 6)) * np.array([1.0, 3.0, 0.2])[None, :, None]
    x[:, 2, 3:] = 0
    views = [x + 0.2 * rng.normal(size=x.shape) for _ in range(3)]
    p = profile(x, views=views, alpha=2.0, temperature=0.3, show_progress=False)
    for layer in range(3):
        xl = x[:, layer]
        assert p.values["dataset_entropy"][layer] == pytest.approx(
            lm.dataset_entropy(xl, 2.0), rel=1e-10
        )
        assert p.values["effective_rank"][layer] == pytest.approx(
            effective_rank(xl, center=True), rel=1e-10
        )
        assert p.values["rankme"][layer] == pytest.approx(lm.rankme(xl), rel=1e-10)
        assert p.values["isotropy"][layer] == pytest.approx(isotropy(xl), rel=1e-10)
        assert p.values["twonn"][layer] == pytest.approx(lm.twonn_dimension(xl), rel=1e-10)
        v = [w[:, layer] for w in views]
        assert p.values["infonce"][layer] == pytest.approx(lm.infonce(v[0], v[1], 0.3), rel=1e-10)
        assert p.values["lidar"][layer] == pytest.approx(lm.lidar(v), rel=1e-10)
        assert p.values["dime"][layer] == pytest.approx(lm.dime(v[0], v[1], alpha=2.0), rel=1e-10)
    np.testing.assert_allclose(p.cka.numpy(), lm.cka_matrix(x).numpy(), rtol=1e-12)
    assert "prompt_entropy" not in p.values  # no tokens given
    assert p.best_layer("effective_rank") != 2  # the half-dead layer ranks last
    assert p.ranking("effective_rank")[-1] == 2


def test_profile_from_tokens_only_uses_pooled_states(rng):
    batches = token_batches(rng)
    p = profile(tokens=iter(batches), show_progress=False)
    acc = TokenMetricAccumulator().consume(batches)
    assert p.values["prompt_entropy"] == pytest.approx(acc.compute()["prompt_entropy"], rel=1e-12)
    pooled = acc.pooled()
    assert p.values["isotropy"] == pytest.approx(
        [isotropy(pooled[:, i]) for i in range(3)], rel=1e-6
    )


def test_profile_errors(rng):
    with pytest.raises(LOESError, match="unknown metric"):
        profile(rng.normal(size=(10, 2, 3)), metrics=["bogus"])
    with pytest.raises(LOESError, match="views"):
        profile(rng.normal(size=(10, 2, 3)), metrics=["lidar"])
    with pytest.raises(LOESError, match="number of layers"):
        profile(rng.normal(size=(10, 2, 3)), views=[rng.normal(size=(10, 3, 3))] * 2)


# --------------------------------------------------------------- selectors
def planted_ranks(rng, n=200):
    """Layer l uses 2·(l+1) of 12 directions; layer 1 is the widest by design."""
    x = rng.normal(size=(n, 4, 12))
    for layer, used in enumerate([2, 12, 4, 6]):
        x[:, layer, used:] = 0
    return x


def test_metric_selector_follows_direction(rng):
    x = planted_ranks(rng)
    res = select_layers_label_free(x, k=2, method="effective_rank", show_progress=False)
    assert res.selected_layers == [1, 3]
    assert res.task == "label_free" and res.config["direction"] == "higher"
    assert res.layer_scores[0] == pytest.approx(-effective_rank(x[:, 1], center=True))
    assert res.steps[1].candidates == [0, 2, 3]
    assert res.steps[0].row(1)["effective_rank"] == pytest.approx(-res.steps[0].row(1)["total"])
    low = select_layers_label_free(
        x, k=1, method="effective_rank", direction="lower", show_progress=False
    )
    assert low.selected_layers == [0]
    back = LOESResult.from_json(res.to_json())
    assert back.selected_layers == res.selected_layers and back.steps[0].terms == res.steps[0].terms
    assert "selected layers [1, 3]" in res.summary()


def test_best_layer_by_metric_and_reused_profile(rng):
    x = planted_ranks(rng)
    prof = profile(x, show_progress=False)
    for name in ("dataset_entropy", "rankme", "isotropy", "twonn"):
        res = best_layer_by_metric(x, name, metric_profile=prof, show_progress=False)
        assert res.selected_layers == [prof.best_layer(name)]
        vals = prof.values[name]
        best = max(vals) if METRICS[name].direction == "higher" else min(vals)
        assert vals[res.selected_layers[0]] == best


def test_loes_label_free_is_the_core_selector(rng):
    x = rng.normal(size=(60, 5, 8))
    x[:, 2] *= np.linspace(0.1, 3, 8)
    a = select_layers_label_free(x, k=2, method="loes", preset="reference", show_progress=False)
    b = select_layers_from_custom_embeddings(
        x, None, 2, task="label_free", preset="reference", show_progress=False
    )
    assert a.selected_layers == b.selected_layers and a.task == "label_free"


def test_selector_errors(rng):
    x = rng.normal(size=(30, 3, 4))
    with pytest.raises(LOESError, match="method must be one of"):
        select_layers_label_free(x, method="bogus")
    with pytest.raises(LOESError, match="only apply to method='loes'"):
        select_layers_label_free(x, method="isotropy", preset="reference")
    with pytest.raises(LOESError, match="views"):
        best_layer_by_metric(x, "infonce")
    with pytest.raises(LOESError, match="direction"):
        best_layer_by_metric(x, "isotropy", direction="up")
    with pytest.raises(LOESError, match="k must be between"):
        select_layers_label_free(x, k=4, method="isotropy")


def test_token_metric_selector_on_planted_smoothness(rng):
    # layer 0: straight token paths; layer 1: random walks; lowest curvature wins
    t = np.linspace(0, 1, 8)[None, :, None]
    straight = rng.normal(size=(6, 1, 5)) + t * rng.normal(size=(6, 1, 5))
    walk = rng.normal(size=(6, 8, 5))
    states = np.stack([straight, walk], 1)
    res = select_layers_label_free(
        tokens=(states, np.ones((6, 8), bool)), method="curvature", show_progress=False
    )
    assert res.selected_layers == [0]
    assert res.steps[0].row(0)["curvature"] == pytest.approx(0.0, abs=1e-6)
    assert not math.isnan(res.steps[0].row(1)["curvature"])


def test_layer_scores_are_signed_lower_is_better(rng):
    from loes.metrics import layer_scores

    x = planted_ranks(rng)
    prof = profile(x, metrics=["effective_rank", "twonn"], show_progress=False)
    assert layer_scores(x, "effective_rank") == pytest.approx(
        [-v for v in prof.values["effective_rank"]]
    )
    assert layer_scores(x, "twonn") == pytest.approx(prof.values["twonn"])
    assert layer_scores(x, "twonn", direction="higher") == pytest.approx(
        [-v for v in prof.values["twonn"]]
    )
