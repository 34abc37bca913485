"""Result types: which method made them, NaN for absent scores, strict JSON both ways,
scores higher-is-better, and the report (not the result) draws the figures."""

import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from loes import LOESError, LOESResult, select_layers_from_custom_embeddings
from loes.baselines import BASELINES, select_baseline
from loes.evaluate import EvaluationResult, evaluate
from loes.metrics import select_layers_label_free
from loes.transfer import LinearProbe, select_layers, take_layers, task_score
from loes.transfer._probes import RIDGE_GRID

FIXED = ("last", "last_k", "all_concat", "layer_weights", "random_k")


@pytest.fixture(scope="module")
def planted():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 240)
    x = rng.normal(size=(240, 5, 8))
    x[:, 2, :3] += 2.0 * np.eye(3)[y]
    return x, y


def _strict_loads(text):
    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------ method
def test_each_result_names_the_method_that_made_it(planted):
    x, y = planted
    loes = select_layers_from_custom_embeddings(x, y, 2, preset="reference", show_progress=False)
    assert (loes.method, loes.preset) == ("loes", "reference")
    for name in BASELINES:
        res = select_baseline(name, x, y, 2, max_combinations=100, metric="effective_rank")
        assert (res.method, res.preset, res.config["method"]) == (name, None, name)
    metric = select_layers_label_free(x, 2, method="effective_rank", show_progress=False)
    assert (metric.method, metric.preset) == ("effective_rank", None)
    assert select_layers_label_free(x, 2, method="loes", show_progress=False).method == "loes"


@pytest.mark.parametrize("name", FIXED)
def test_fixed_baselines_report_nan_scores_not_zeros(planted, name):
    x, y = planted
    res = select_baseline(name, x, y, 3)
    assert len(res.layer_scores) == len(res.selected_layers)
    assert all(math.isnan(s) for s in res.layer_scores)
    text = res.to_json()
    assert "NaN" not in text and _strict_loads(text)["layer_scores"] == [None] * len(
        res.selected_layers
    )
    back = LOESResult.from_json(text)
    assert all(math.isnan(s) for s in back.layer_scores)
    assert (back.method, back.preset, back.selected_layers) == (name, None, res.selected_layers)
    summary = back.summary()
    assert (
        summary.startswith(f"{name} (classification)") and "—" in summary and "nan" not in summary
    )


def test_scored_baselines_keep_finite_scores(planted):
    x, y = planted
    res = select_baseline("greedy_probe", x, y, 2)
    assert res.selected_layers[0] == 2 and all(math.isfinite(s) for s in res.layer_scores)


# -------------------------------------------------------------------- JSON
def test_loes_result_round_trip_keeps_method_preset_and_nan(planted):
    x, y = planted
    res = select_layers_from_custom_embeddings(x, y, 2, show_progress=False)
    res.steps[0].terms["fit"][0] = float("nan")
    res.config["weird"] = float("inf")
    text = res.to_json()
    data = _strict_loads(text)
    assert data["steps"][0]["terms"]["fit"][0] is None and data["config"]["weird"] is None
    back = LOESResult.from_json(text)
    assert (back.method, back.preset) == ("loes", "robust")
    assert math.isnan(back.steps[0].terms["fit"][0])
    assert back.steps[0].terms["total"] == res.steps[0].terms["total"]
    assert back.selected_layers == res.selected_layers and back.layer_scores == res.layer_scores
    assert "nan" not in back.summary() and back.summary().count("—") == 1  # the one NaN cell


def test_evaluate_needs_scipy_before_any_selection(planted, monkeypatch):
    import loes.evaluate as ev_module

    def no_scipy():
        raise ImportError("this feature requires scipy: pip install 'loes[sklearn]'")

    def never(*args, **kwargs):
        raise AssertionError("a selection ran before the missing dependency was reported")

    monkeypatch.setattr(ev_module, "_scipy_stats", no_scipy)
    monkeypatch.setattr(ev_module, "select_layers_from_custom_embeddings", never)
    x, y = planted
    with pytest.raises(ImportError, match=r"pip install 'loes\[sklearn\]'"):
        evaluate(x, y, k=2, methods=["loes", "last"], seeds=[0], show_progress=False)


@pytest.mark.parametrize(
    "preset,config,method,new_preset",
    [
        ("reference", {"gamma": 0.2}, "loes", "reference"),  # LOES written before `method`
        ("last_k", {"method": "last_k", "head": "concat"}, "last_k", None),  # a baseline
        ("metric", {"method": "twonn", "direction": "lower"}, "twonn", None),  # a metric selector
    ],
)
def test_old_json_without_method_still_loads(preset, config, method, new_preset):
    old = {
        "selected_layers": [1, 2],
        "layer_scores": [0.5, None],
        "task": "classification",
        "num_layers_seen": 4,
        "num_calibration_samples": 30,
        "pooling": "precomputed",
        "preset": preset,
        "config": config,
        "steps": [],
    }
    res = LOESResult.from_dict(old)
    assert (res.method, res.preset) == (method, new_preset)
    assert res.layer_scores[0] == 0.5 and math.isnan(res.layer_scores[1])


def test_evaluation_json_with_nan_round_trips_and_formats(planted):
    x, y = planted
    ev = evaluate(
        x,
        y,
        k=2,
        methods=["loes", "last", "random_k"],
        seeds=[0],
        per_layer=True,
        show_progress=False,
    )
    # one seed: the t-test is undefined (NaN t and p), and a score made NaN on purpose
    assert math.isnan(ev.tests["last"]["p"]) and math.isnan(ev.tests["last"]["t"])
    ev.rows[1]["val_score"] = float("nan")
    ev.per_layer["std"][0] = float("nan")
    text = ev.to_json()
    data = _strict_loads(text)
    assert data["tests"]["last"]["p"] is None and data["rows"][1]["val_score"] is None
    back = EvaluationResult.from_json(text)
    assert math.isnan(back.tests["last"]["p"]) and back.tests["last"]["n"] == 1
    assert math.isnan(back.rows[1]["val_score"]) and math.isnan(back.per_layer["std"][0])
    assert back.scores("loes") == ev.scores("loes")
    assert back.selection("last").method == "last"
    assert math.isnan(back.selection("last").layer_scores[0])
    table = back.format_table()
    assert table == ev.format_table()
    last_row = next(line for line in table.splitlines() if line.startswith("last "))
    assert last_row.split()[-2:] == [f"{ev.tests['last']['mean_diff']:+.3f}", "—"]
    assert "nan" not in table.lower()


def test_json_written_by_the_old_policies_still_loads():
    """Before loes._json: LOESResult wrote bare NaN tokens, EvaluationResult wrote "nan" strings."""
    old_result = (
        '{"selected_layers": [3], "layer_scores": [NaN], "task": "classification", '
        '"num_layers_seen": 4, "num_calibration_samples": 30, "pooling": "precomputed", '
        '"preset": "last", "config": {"method": "last", "head": "concat"}}'
    )
    res = LOESResult.from_json(old_result)
    assert (res.method, res.preset) == ("last", None) and math.isnan(res.layer_scores[0])
    old_eval = {
        "rows": [
            {
                "method": "loes",
                "seed": 0,
                "layers": [1],
                "head": "concat",
                "score": 0.9,
                "val_score": "nan",
                "selection_time": 0.1,
                "training_time": 0.2,
            }
        ],
        "metric": "rmse",
        "task": "regression",
        "k": 1,
        "probe": "ridge",
        "seeds": [0],
        "fractions": [0.25, 0.4, 0.15, 0.2],
        "tests": {"last": {"mean_diff": 0.1, "t": "nan", "p": "nan", "n": 1}},
    }
    ev = EvaluationResult.from_dict(old_eval)
    assert math.isnan(ev.rows[0]["val_score"]) and math.isnan(ev.tests["last"]["p"])
    assert ev.format_table().splitlines()[0].split()[2] == "RMSE"


def test_evaluation_table_shows_a_dash_for_a_missing_score():
    ev = EvaluationResult(
        rows=[
            {
                "method": "loes",
                "seed": 0,
                "layers": [1],
                "head": "concat",
                "score": float("nan"),
                "val_score": 0.5,
                "selection_time": 0.1,
                "training_time": 0.2,
            }
        ],
        metric="r2",
        task="regression",
        k=1,
        probe="ridge",
        seeds=[0],
        fractions=[0.25, 0.4, 0.15, 0.2],
    )
    row = ev.format_table().splitlines()[1].split()
    assert row[:3] == ["loes", "1", "—"]
    assert ev.format_table().splitlines()[0].split()[2] == "R²"


BAD_JSON = [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "the JSON text holds a JSON list, not a JSON object (LOES result)"),
    ("/no/such/result.json", "LOES result file not found: /no/such/result.json"),
    ('{"selected_layers": [1]}', "missing field(s) ['layer_scores', 'num_calibration_samples'"),
    (
        (
            '{"selected_layers": [1], "layer_scores": [0.1], "task": "classification", "num_layers_seen": 3,'
            ' "num_calibration_samples": 9, "pooling": "mean", "presett": "robust"}'
        ),
        "unknown field(s) ['presett']",
    ),
    (12, "expected JSON text or the path of a JSON file"),
    ({"selected_layers": [1]}, "for a dict use from_dict"),
]


@pytest.mark.parametrize("source,message", BAD_JSON)
def test_bad_result_json_is_a_clear_error(source, message):
    with pytest.raises(LOESError) as info:
        LOESResult.from_json(source)
    assert message in str(info.value)


def test_bad_result_files_are_clear_errors(tmp_path):
    array = tmp_path / "array.json"
    array.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(LOESError, match="array.json' holds a JSON list, not a JSON object"):
        LOESResult.from_json(str(array))
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"a": "\xe9"}')
    with pytest.raises(LOESError, match="latin.json: not UTF-8 text"):
        LOESResult.from_json(latin)
    with pytest.raises(
        LOESError, match=r"evaluation result dict with missing field\(s\) \['fractions'"
    ):
        EvaluationResult.from_json('{"rows": []}')
    with pytest.raises(LOESError, match=r"expected a dict \(evaluation result\); got list"):
        EvaluationResult.from_dict([1, 2])


# ------------------------------------------------------------------ scores
def test_task_score_is_r2_and_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    truth = rng.normal(size=(40, 3)) * [1.0, 5.0, 0.1]
    pred = truth + rng.normal(size=(40, 3))
    for t, p in [(truth[:, 0], pred[:, 0]), (truth[:, 1:2], pred[:, 1:2])]:
        assert task_score(p, t, "regression") == pytest.approx(metrics.r2_score(t, p), rel=1e-12)
    assert task_score(
        torch.from_numpy(pred), torch.from_numpy(truth), "regression"
    ) == pytest.approx(metrics.r2_score(truth, pred, multioutput="variance_weighted"), rel=1e-12)
    const = np.full(5, 2.0)
    assert task_score(const, const, "regression") == 1.0  # scikit-learn's force_finite convention
    assert task_score(const + 1, const, "regression") == 0.0
    assert task_score([0, 1, 2, 2], [0, 1, 1, 2], "classification") == 0.75


def test_linear_probe_regression_choice_is_unchanged_by_the_sign_flip():
    """Highest validation R² = lowest validation RMSE: the chosen ridge is the RMSE argmin."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(160, 2, 20))
    y = x[:, 1, :4].sum(1) + rng.normal(size=160)
    probe = LinearProbe(task="regression").fit(x[:100], y[:100], x[100:], y[100:])
    rmse = {}
    for rel in RIDGE_GRID:
        one = LinearProbe(task="regression", grid=[rel]).fit(x[:100], y[:100], x[100:], y[100:])
        rmse[rel] = float(np.sqrt(np.mean((one.predict(x[100:]) - y[100:]) ** 2)))
        assert probe.val_scores_[rel] == pytest.approx(one.score(x[100:], y[100:]), abs=1e-12)
    best = min(rmse.values())
    assert probe.best_param_ == max(r for r, v in rmse.items() if v <= best * (1 + 1e-12))
    assert probe.best_val_score_ == max(probe.val_scores_.values())


# ---------------------------------------------------------------- renaming
def test_take_layers_and_its_deprecated_alias(planted):
    x, _ = planted
    got = take_layers(x, [3, 1])
    assert [t.dtype for t in got] == [torch.float64] * 2
    np.testing.assert_array_equal(got[0].numpy(), x[:, 3])
    with pytest.warns(DeprecationWarning, match="use loes.transfer.take_layers"):
        old = select_layers(x, [3, 1])
    assert all(torch.equal(a, b) for a, b in zip(old, got))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LinearProbe(layers=[2]).fit(
            x[:150], planted[1][:150]
        )  # the library no longer calls the alias


# ---------------------------------------------------------------- plotting
def test_plotting_lives_in_the_report_and_uses_no_pyplot_state(tmp_path):
    pytest.importorskip("matplotlib")
    assert not hasattr(LOESResult, "plot")
    script = f"""
import sys, numpy as np, matplotlib
before = matplotlib.rcParams._get_backend_or_none()
from loes import select_layers_from_custom_embeddings
from loes.metrics import profile
from loes.report import plot_result
x = np.random.default_rng(0).normal(size=(80, 3, 6)); y = np.arange(80) % 2
fig = plot_result(select_layers_from_custom_embeddings(x, y, 2, show_progress=False), r"{tmp_path / "a.png"}")
prof = profile(x, metrics=["isotropy", "twonn"], show_progress=False)
fig2 = prof.plot(r"{tmp_path / "b.png"}", title="t")
from matplotlib.figure import Figure
assert isinstance(fig, Figure) and isinstance(fig2, Figure)
assert len([ax for ax in fig2.axes if ax.get_title()]) == 3, [ax.get_title() for ax in fig2.axes]
print("matplotlib.pyplot" in sys.modules, matplotlib.rcParams._get_backend_or_none() == before)
"""
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "True"]
    for name in ("a.png", "b.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
