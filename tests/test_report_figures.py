"""Reports: figures show what the result holds; the HTML report links existing PNGs."""

import html
import re

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from loes import LOESError, select_layers_from_custom_embeddings  # noqa: E402
from loes._linalg import linear_cka  # noqa: E402
from loes.baselines import select_baseline  # noqa: E402
from loes.evaluate import evaluate  # noqa: E402
from loes.report import cka_heatmap_matrix, plot_cka, plot_result, plot_trace, write_report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def planted():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = rng.normal(size=(300, 5, 12)).astype(np.float32)
    x[:, 1, :3] += 2.0 * np.eye(3)[y]
    x[:, 3] = x[:, 1] + 0.2 * rng.normal(size=(300, 12))
    return x, y


def test_plot_result_has_one_panel_per_step_with_the_picks(planted, tmp_path):
    x, y = planted
    res = select_layers_from_custom_embeddings(x, y, k=3, show_progress=False)
    fig = plot_result(
        res, tmp_path / "terms.png"
    )  # LOESResult.plot was removed: plotting is the report's
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert len(axes) == 3
    for ax, table in zip(axes, res.steps):
        assert ax.get_title().endswith(f"picked layer {table.selected}")
        heights = {round(p.get_x() + p.get_width() / 2): p.get_height() for p in ax.patches}
        assert heights == pytest.approx(dict(zip(table.candidates, table.terms["total"])))
    assert (tmp_path / "terms.png").read_bytes()[:8] == PNG_MAGIC


def test_trace_marks_each_pick(planted):
    x, y = planted
    res = select_layers_from_custom_embeddings(x, y, k=2, show_progress=False)
    fig = plot_trace(res)
    ax = fig.axes[0]
    texts = {t.get_text(): t.get_position() for t in ax.texts}
    for step, layer in enumerate(res.selected_layers, 1):
        assert texts[str(step)] == (layer, step - 1)


def test_plot_result_refuses_results_without_steps(planted):
    x, _ = planted
    with pytest.raises(LOESError, match="no per-step score tables"):
        plot_result(select_baseline("last_k", x, k=2))


def test_cka_heatmap_matches_pairwise_debiased_cka(planted):
    """The heatmap shows the selector's quantity: debiased CKA (issue 10)."""
    x, _ = planted
    m = cka_heatmap_matrix(x)
    for i in range(5):
        for j in range(5):
            assert m[i, j] == pytest.approx(linear_cka(x[:, i], x[:, j], debiased=True), abs=1e-9)
    fig = plot_cka(cka=m, selected=[1])
    shown = fig.axes[0].images[0].get_array()
    np.testing.assert_allclose(np.asarray(shown), m)


def test_write_report_links_existing_figures(planted, tmp_path):
    x, y = planted
    ev = evaluate(
        x, y, k=2, methods=["loes", "last", "greedy_probe"], seeds=[0, 1], show_progress=False
    )
    res = ev.selection("loes")
    path = write_report(res, tmp_path / "rep", embeddings=x, evaluation=ev, title="planted <test>")
    text = path.read_text()
    images = re.findall(r'<img src="([^"]+)"', text)
    assert set(images) == {
        "comparison.png",
        "score_terms.png",
        "selection_trace.png",
        "cka.png",
        "per_layer_probe.png",
    }
    for name in images:
        assert (path.parent / name).read_bytes()[:8] == PNG_MAGIC
    assert "planted &lt;test&gt;" in text  # escaped
    loes_row = re.search(r'<tr class="loes">(.*?)</tr>', text).group(1)
    assert f"{ev.mean_score('loes'):.4f}" in loes_row
    # a fixed baseline result: no step plots, but the report is still written
    plain = write_report(select_baseline("last", x, k=1), tmp_path / "plain")
    assert "<img" not in plain.read_text()
    # its score is absent (NaN), shown as a dash; the method, not a preset, is named
    assert '<td class="l">4</td><td class="">—</td>' in plain.read_text()
    assert "method <b>last</b>" in plain.read_text() and "preset" not in plain.read_text()


def test_report_shows_the_estimate_and_its_verdict(planted, tmp_path):
    x, y = planted
    res = select_layers_from_custom_embeddings(x, y, k=2, show_progress=False)
    text = write_report(res, tmp_path / "est").read_text()
    est = res.estimate
    assert "<h2>Is it worth it?</h2>" in text
    assert html.escape(est.verdict()) in text
    assert est.rows_used() in text
    row = re.search(r"<tr><td class=\"l\">last</td>(.*?)</tr>", text).group(1)
    assert f"{est.mean['last']:.4f} ± {est.se['last']:.4f}" in row
    assert f"{est.diff['last']:+.4f}" in row
    bare = select_layers_from_custom_embeddings(x, y, k=2, estimate=False, show_progress=False)
    assert "Is it worth it?" not in write_report(bare, tmp_path / "bare").read_text()
