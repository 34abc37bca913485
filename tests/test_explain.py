"""Score tables say what each term is, its weight and sign; each pick comes with its why."""

import html
import re
import warnings

import numpy as np
import pytest

from loes import LOESError, select_layers_from_custom_embeddings
from loes._linalg import isotropy, linear_cka, reference_isotropy
from loes._naming import layer_label
from loes.core import DEFAULTS
from loes.metrics import select_layers_label_free
from loes.sweep import sweep_layers

NAMES = [f"hidden_states[{i + 1}]" for i in range(6)]


@pytest.fixture(scope="module")
def duplicate():
    """Layer 1 carries the labels; layer 2 is a near copy of it (as strong, redundant);
    layer 4 carries a second, weaker view of the labels."""
    rng = np.random.default_rng(0)
    n = 300
    y = rng.integers(0, 4, n)
    x = rng.normal(size=(n, 6, 16))
    x[:, 1, :4] += 1.5 * np.eye(4)[y]
    x[:, 2] = x[:, 1] + 0.05 * rng.normal(size=(n, 16))
    x[:, 4, 4:8] += 1.0 * np.eye(4)[y]
    return x, y


def _select(x, y, preset, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # N <= D and uninformative-step warnings are not tested here
        return select_layers_from_custom_embeddings(
            x, y, k=3, preset=preset, show_progress=False, layer_names=NAMES, **kw
        )


# ----------------------------------------------------------- terms and total
@pytest.mark.parametrize("preset", ["robust", "reference"])
def test_total_is_the_documented_sum_of_the_term_columns(duplicate, preset):
    pd = pytest.importorskip("pandas")
    x, y = duplicate
    res = _select(x, y, preset)
    w = DEFAULTS[preset]
    assert res.score_formula() == (
        f"total = {'fit (in-sample MSE)' if preset == 'reference' else 'fit (unexplained fraction)'}"
        f" + {'' if w['alpha'] == 1 else format(w['alpha'], 'g') + '·'}isotropy penalty"
        f" + {format(w['gamma'], 'g')}·redundancy penalty − {format(w['eta'], 'g')}·geometry bonus;"
        " lower is better"
    )
    frame = res.to_frame()
    assert isinstance(frame, pd.DataFrame)
    assert frame.attrs["weights"] == {
        "fit": 1.0,
        "isotropy_penalty": w["alpha"],
        "redundancy_penalty": w["gamma"],
        "geometry_bonus": -w["eta"],
    }
    recomputed = (
        frame["fit"]
        + w["alpha"] * frame["isotropy_penalty"]
        + w["gamma"] * frame["redundancy_penalty"]
        - w["eta"] * frame["geometry_bonus"]
    )
    np.testing.assert_allclose(frame["total"], recomputed, rtol=0, atol=1e-9)
    for table in res.steps:  # the rows of score_table are the same numbers
        for row in res.score_table(table.step):
            again = sum(row[col] * wt for col, wt in frame.attrs["weights"].items())
            assert row["total"] == pytest.approx(again, abs=1e-9)
    assert set(frame["name"]) <= set(NAMES)


@pytest.mark.parametrize("preset", ["robust", "reference"])
def test_penalty_columns_hold_their_definitions(duplicate, preset):
    x, y = duplicate
    res = _select(x, y, preset, **({"standardize": False} if preset == "robust" else {}))
    first = {int(r["layer"]): r for r in res.score_table(1)}
    for layer in range(6):
        iso = isotropy(x[:, layer]) if preset == "robust" else reference_isotropy(x[:, layer])
        assert first[layer]["isotropy_penalty"] == pytest.approx(1.0 - iso, rel=1e-6, abs=1e-9)
        assert first[layer]["redundancy_penalty"] == 0.0
    if preset == "robust":  # redundancy: the largest (debiased) CKA with a layer picked before
        s1 = res.selected_layers[0]
        for row in res.score_table(2):
            cka = linear_cka(x[:, int(row["layer"])], x[:, s1], debiased=True)
            assert row["redundancy_penalty"] == pytest.approx(cka, abs=1e-6)


def test_label_free_total_has_only_the_isotropy_and_redundancy_terms(duplicate):
    x, _ = duplicate
    res = select_layers_label_free(x, 3, method="loes", show_progress=False)
    assert (
        res.score_formula()
        == "total = 0.1·isotropy penalty + 0.1·redundancy penalty; lower is better"
    )
    for table in res.steps:
        for row in res.score_table(table.step):
            assert set(row) == {"layer", "isotropy_penalty", "redundancy_penalty", "total"}
            assert row["total"] == pytest.approx(
                0.1 * row["isotropy_penalty"] + 0.1 * row["redundancy_penalty"], abs=1e-12
            )


def test_metric_selector_states_its_sign(duplicate):
    x, _ = duplicate
    res = select_layers_label_free(x, 2, method="effective_rank", show_progress=False)
    direction = res.config["direction"]
    assert res.score_formula() == (
        f"total = {'' if direction == 'lower' else '−'}effective_rank; lower is better"
    )
    row = res.score_table(1)[0]
    assert row["total"] == pytest.approx(
        (1 if direction == "lower" else -1) * row["effective_rank"]
    )


# ------------------------------------------------------------------ why
def test_why_names_the_repeated_layer_and_its_cka(duplicate):
    x, y = duplicate
    res = _select(x, y, "robust")
    first = res.selected_layers[0]
    assert first in (1, 2)
    twin = 3 - first  # the copy of the first pick, as strong on its own
    assert twin not in res.selected_layers
    sweep = sweep_layers(x, y, show_progress=False)
    assert sweep.scores_[twin] > sweep.scores_[res.selected_layers[1]]  # a strong layer was skipped
    why = res.explain(probe=sweep)
    assert len(why) == 3 and why[0].startswith(f"step 1: {first} (hidden_states[{first + 1}])")
    cka = linear_cka(x[:, twin], x[:, first], debiased=True)
    expected = f"{layer_label(twin, NAMES)} repeats {layer_label(first, NAMES)} (CKA {cka:.2f} vs "
    assert f"over {layer_label(twin, NAMES)} (best own probe score" in why[1]
    assert expected in why[1], why[1]
    # the redundancy is the largest reason, and its share is gamma × the CKA difference
    reasons = why[1][why[1].index("), total") :].split(": ", 1)[1].split("); ")
    assert reasons[0].startswith(layer_label(twin, NAMES) + " repeats")
    row = {int(r["layer"]): r for r in res.score_table(2)}
    share = 0.1 * (
        row[twin]["redundancy_penalty"] - row[res.selected_layers[1]]["redundancy_penalty"]
    )
    assert f"; {share:+.3g}" in reasons[0]
    # summary shows the same sentences, the formula and the probe column
    text = res.summary(probe=sweep)
    assert why[1] in text and res.score_formula() in text and "own probe (CV accuracy)" in text
    assert f"{sweep.scores_[twin]:.4f}" in text
    plain = res.summary()
    assert "own probe" not in plain and "best own probe score" not in plain and "runner-up" in plain


def test_why_without_probe_compares_with_the_runner_up(duplicate):
    x, y = duplicate
    res = _select(x, y, "robust")
    for table, sentence in zip(res.steps, res.explain()):
        ranked = res.score_table(table.step)
        runner = int(ranked[1]["layer"])
        assert (
            f"over {layer_label(runner, NAMES)} (runner-up), total {ranked[0]['total']:.4f} vs "
            f"{ranked[1]['total']:.4f}" in sentence
        )


def test_probe_must_be_a_sweep_or_a_mapping(duplicate):
    x, y = duplicate
    res = _select(x, y, "robust")
    with pytest.raises(LOESError, match="probe must be a fitted LayerSweep"):
        res.summary(probe=[0.5, 0.6])
    assert "own probe score" in res.summary(probe={i: 0.1 * i for i in range(6)})


# ---------------------------------------------------------------- naming
def test_one_naming_scheme():
    assert layer_label(7, [f"hidden_states[{i + 1}]" for i in range(12)]) == "7 (hidden_states[8])"
    assert layer_label(7) == "7" and layer_label(7, ["a"]) == "7"


def test_summary_names_layers_with_index_and_model_name(duplicate):
    x, y = duplicate
    res = _select(x, y, "robust")
    text = res.summary()
    for i, layer in enumerate(res.selected_layers, 1):
        assert re.search(rf"^\s+{i}\s+{re.escape(layer_label(layer, NAMES))}\s", text, re.M)
    assert "hidden_states[0]" not in text  # never the off-by-one name


# ---------------------------------------------------------------- report
def test_report_explains_the_picks_with_probe_scores(duplicate, tmp_path):
    pytest.importorskip("matplotlib")
    from loes.report import write_report

    x, y = duplicate
    res = _select(x, y, "robust")
    text = write_report(res, tmp_path, embeddings=x, targets=y).read_text()
    assert "<h2>Why these layers</h2>" in text
    assert "total = fit (unexplained fraction) + 0.1·isotropy penalty" in text
    assert "isotropy penalty (×+0.1)" in text and "geometry bonus (×−0.05)" in text
    assert "own probe (CV accuracy)" in text
    for sentence in res.explain(probe=sweep_layers(x, y, show_progress=False)):
        assert html.escape(sentence) in text
    assert text.count("score table (pick:") == 3
