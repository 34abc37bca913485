"""The evaluation protocol: splits are honoured, LOES beats bad baselines on planted data,
and the paired t-test agrees with scipy."""

import math
import warnings

import numpy as np
import pytest

from loes import LOESError, LOESWarning
from loes.baselines import select_baseline
from loes.evaluate import EvaluationResult, evaluate, paired_ttest
from loes.transfer import split_indices


def _planted(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 6, 16)).astype(np.float32)
    x[:, 2, :3] += 1.5 * np.eye(3)[y]
    x[:, 4, 3:6] += 1.0 * np.eye(3)[y]
    return x, y


def test_paired_ttest_p_value_matches_the_closed_form():
    pytest.importorskip("scipy.stats")
    # differences 0.2, 0.05, 0.05, 0.1: mean 0.1, sd sqrt(0.005), t = 2*sqrt(2), df = 3,
    # where Student's CDF has a closed form: p = 1 - (2/pi) (x / (1 + x^2) + atan x), x = t / sqrt(3)
    res = paired_ttest([0.9, 0.8, 0.85, 0.7], [0.7, 0.75, 0.8, 0.6])
    x = math.sqrt(8 / 3)
    assert res["t"] == pytest.approx(2 * math.sqrt(2), rel=1e-12)
    assert res["p"] == pytest.approx(1 - 2 / math.pi * (x / (1 + x * x) + math.atan(x)), rel=1e-10)
    assert res["p"] == pytest.approx(0.0662756, abs=1e-7)
    assert res["mean_diff"] == pytest.approx(0.1) and res["n"] == 4


def test_paired_ttest_degenerate_cases():
    assert paired_ttest([0.5, 0.6], [0.5, 0.6])["p"] == 1.0
    same_gap = paired_ttest([0.7, 0.8, 0.9], [0.6, 0.7, 0.8])
    assert same_gap["p"] == 0.0 and same_gap["t"] == math.inf
    assert math.isnan(paired_ttest([0.5], [0.4])["p"])
    with pytest.raises(LOESError, match="equal length"):
        paired_ttest([1, 2], [1, 2, 3])


def test_loes_beats_last_layer_and_finds_planted_layers():
    x, y = _planted()
    ev = evaluate(
        x,
        y,
        k=2,
        methods=["loes", "last", "last_k", "greedy_probe"],
        seeds=[0, 1, 2],
        show_progress=False,
    )
    assert ev.mean_score("loes") > ev.mean_score("last") + 0.2
    assert ev.mean_score("loes") > ev.mean_score("last_k") + 0.1
    assert all(r["layers"][0] == 2 for r in ev.rows if r["method"] == "loes")
    assert ev.tests["last"]["mean_diff"] == pytest.approx(
        ev.mean_score("loes") - ev.mean_score("last")
    )
    assert ev.tests["last"]["p"] < 0.05
    # the per-layer probe sweep ranks the planted layers first
    best_two = np.argsort(ev.per_layer["mean"])[-2:]
    assert set(best_two.tolist()) == {2, 4}
    majority = []
    for seed in (0, 1, 2):
        _, tr, _, te = split_indices(len(y), (0.25, 0.4, 0.15, 0.2), seed, y)
        majority.append(np.mean(y[te] == np.bincount(y[tr]).argmax()))
    assert ev.info["majority_accuracy"] == pytest.approx(np.mean(majority))
    text = ev.format_table()
    assert text.splitlines()[1].startswith("loes") and "greedy_probe" in text
    again = EvaluationResult.from_json(ev.to_json())
    assert again.scores("loes") == ev.scores("loes")


def test_selection_sees_only_the_calibration_split():
    x, y = _planted(n=200)
    ids = np.arange(200, dtype=np.float32)
    x[:, 0, 0] = ids  # the sample id, readable by a custom selector
    seen = {}

    def spy(emb, targets, k, task, random_state):
        seen[random_state] = sorted(int(v) for v in np.asarray(emb[0][:, 0]))
        return select_baseline("last", emb, targets, k, task=task)

    fractions = (0.3, 0.3, 0.2, 0.2)
    evaluate(
        x,
        y,
        k=1,
        methods=[("spy", spy)],
        seeds=[3, 4],
        fractions=fractions,
        per_layer=False,
        show_progress=False,
    )
    for seed in (3, 4):
        cal = split_indices(200, fractions, seed, y)[0]
        assert seen[seed] == cal.tolist()
    assert seen[3] != seen[4]


def test_regression_evaluation_reports_r2():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 5, 8))
    y = x[:, 1] @ rng.normal(size=8)
    ev = evaluate(
        x,
        y,
        k=1,
        task="regression",
        methods=["loes", "last"],
        seeds=[0, 1],
        per_layer=False,
        show_progress=False,
    )
    assert ev.metric == "r2"  # higher is better, like accuracy (was "rmse", lower is better)
    assert ev.mean_score("loes") > 0.95 and ev.mean_score("last") < 0.2
    assert (
        ev.tests["last"]["mean_diff"] > 0
    )  # LOES minus the last layer: positive means LOES is better


def test_exhaustive_dropped_by_default_when_too_large_but_refused_when_asked():
    x = np.random.default_rng(0).normal(size=(120, 14, 3))
    y = np.arange(120) % 2
    with pytest.raises(LOESError, match="max_combinations"):
        evaluate(
            x,
            y,
            k=3,
            methods=["exhaustive"],
            seeds=[0],
            show_progress=False,
            baseline_options={"max_combinations": 100},
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ev = evaluate(
            x,
            y,
            k=3,
            seeds=[0],
            per_layer=False,
            show_progress=False,
            baseline_options={"max_combinations": 100},
        )
    assert "exhaustive" not in ev.methods and "greedy_probe" in ev.methods
    assert any(
        issubclass(w.category, LOESWarning) and "exhaustive" in str(w.message) for w in caught
    )


def test_bad_protocol_settings():
    x, y = _planted(n=60)
    with pytest.raises(LOESError, match="probe must be"):
        evaluate(x, y, probe="svm", show_progress=False)
    with pytest.raises(LOESError, match="4 shares"):
        evaluate(x, y, fractions=(0.5, 0.5), show_progress=False)
    with pytest.raises(LOESError, match="unknown method"):
        evaluate(x, y, methods=["loes", "oracle"], show_progress=False)


def test_fusion_head_probe_with_georeg_in_the_protocol():
    x, y = _planted(n=300)
    ev = evaluate(
        x,
        y,
        k=2,
        methods=["loes", "last"],
        seeds=[0],
        probe="fusion",
        per_layer=False,
        fusion_options={"epochs": 40, "georeg": 0.1, "hidden": 32, "batch_size": 32},
        show_progress=False,
    )
    assert ev.probe == "fusion"
    assert ev.mean_score("loes") > ev.mean_score("last") + 0.2
    assert all(r["training_time"] > 0 and 0 < r["val_score"] <= 1 for r in ev.rows)
