"""``loes select`` prints the layer table or JSON and agrees with the library call."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from loes import LOESResult, select_layers_from_hf_id  # noqa: E402
from loes.cli import build_parser, main  # noqa: E402
from loes.datasets import load_bbc_news, minilm_path  # noqa: E402


@pytest.fixture(scope="module")
def csv_path(tmp_path_factory):
    ds = load_bbc_news(max_per_class=8, random_state=2)
    path = tmp_path_factory.mktemp("data") / "titles.csv"
    datasets.Dataset.from_dict({"headline": list(ds["title"]), "topic": list(ds["label"])}).to_csv(
        str(path)
    )
    return str(path)


def test_select_json_matches_the_library(csv_path, capsys, tmp_path):
    out = tmp_path / "result.json"
    code = main(
        [
            "select",
            "--model",
            minilm_path(),
            "--dataset",
            csv_path,
            "--text-key",
            "headline",
            "--target-key",
            "topic",
            "--k",
            "3",
            "--max-samples",
            "30",
            "--json",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    api = select_layers_from_hf_id(
        minilm_path(),
        csv_path,
        text_key="headline",
        target_key="topic",
        k=3,
        max_calibration_samples=30,
        show_progress=False,
    )
    assert printed["selected_layers"] == api.selected_layers
    assert printed["layer_names"] == api.layer_names and printed["num_calibration_samples"] == 30
    assert LOESResult.from_json(str(out)).selected_layers == api.selected_layers


def test_select_prints_the_layer_table(csv_path, capsys):
    main(
        [
            "select",
            "--model",
            minilm_path(),
            "--dataset",
            csv_path,
            "--text-key",
            "headline",
            "--target-key",
            "topic",
            "--k",
            "2",
            "--max-samples",
            "20",
            "--preset",
            "robust",
            "--progress",
            "off",
        ]
    )
    text = capsys.readouterr().out
    assert "LOES (robust, classification): selected layers" in text and "hidden_states[" in text


def test_missing_column_is_a_clear_error(csv_path, capsys):
    code = main(["select", "--model", minilm_path(), "--dataset", csv_path, "--k", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "no target column" in err and "['headline', 'topic']" in err


def test_help_has_an_example():
    sub = build_parser()._subparsers._group_actions[0].choices["select"]
    assert "loes select --model" in sub.format_help()


def test_method_options_reach_the_selector(csv_path, capsys):
    code = main(
        [
            "select",
            "--model",
            minilm_path(),
            "--dataset",
            csv_path,
            "--text-key",
            "headline",
            "--target-key",
            "topic",
            "--k",
            "2",
            "--max-samples",
            "24",
            "--cv",
            "loo",
            "--reg",
            "0.5",
            "--gamma",
            "0",
            "--json",
        ]
    )
    assert code == 0
    config = json.loads(capsys.readouterr().out)["config"]
    assert (config["cv"], config["reg"], config["gamma"]) == ("loo", 0.5, 0.0)
