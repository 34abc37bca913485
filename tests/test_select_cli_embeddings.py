"""``loes select --embeddings``: selection from precomputed features on the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import planted

from loes import select_layers_from_custom_embeddings
from loes._io import load_embeddings_file, load_targets_file
from loes.cli import main


@pytest.fixture(scope="module")
def data():
    return planted(150, 24, informative=(4, 1), n_layers=6, seed=5)


def _run(capsys, argv):
    code = main(["select", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_npz_with_targets_matches_the_library(data, tmp_path, capsys):
    x, y = data
    path = tmp_path / "feats.npz"
    np.savez(path, embeddings=x, targets=y)
    code, out, _ = _run(capsys, ["--embeddings", str(path), "--k", "2", "--json"])
    assert code == 0
    printed = json.loads(out)
    api = select_layers_from_custom_embeddings(x, y, k=2, show_progress=False)
    assert printed["selected_layers"] == api.selected_layers == [4, 1]
    assert printed["layer_scores"] == pytest.approx(api.layer_scores, rel=1e-6)


def test_npy_with_string_labels_from_a_text_file_and_method_options(data, tmp_path, capsys):
    x, y = data
    np.save(tmp_path / "feats.npy", x)
    (tmp_path / "labels.txt").write_text("\n".join(f"class-{v}" for v in y) + "\n")
    code, out, _ = _run(
        capsys,
        [
            "--embeddings",
            str(tmp_path / "feats.npy"),
            "--targets",
            str(tmp_path / "labels.txt"),
            "--k",
            "2",
            "--cv",
            "loo",
            "--reg",
            "0.5",
            "--json",
        ],
    )
    assert code == 0
    printed = json.loads(out)
    assert printed["config"]["cv"] == "loo" and printed["config"]["reg"] == 0.5
    api = select_layers_from_custom_embeddings(x, y, k=2, cv="loo", reg=0.5, show_progress=False)
    assert printed["selected_layers"] == api.selected_layers


def test_safetensors_and_torch_files_in_the_cache_layout(data, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    x, y = data
    st.save_file(
        {"embeddings": torch.from_numpy(x).float(), "targets": torch.from_numpy(y)},
        str(tmp_path / "c.safetensors"),
    )
    torch.save(
        {"hidden_states": torch.from_numpy(x), "labels": torch.from_numpy(y)}, tmp_path / "c.pt"
    )
    for name in ("c.safetensors", "c.pt"):
        emb, tgt = load_embeddings_file(tmp_path / name)
        assert tuple(emb.shape) == x.shape and np.array_equal(np.asarray(tgt), y)


def test_text_targets_parse_as_integers_then_floats_then_strings(tmp_path):
    for text, expected in (
        ("1\n2\n3\n", np.array([1, 2, 3])),
        ("0.5\n2\n", np.array([0.5, 2.0])),
        ("a\nb\n", np.array(["a", "b"])),
    ):
        (tmp_path / "t.txt").write_text(text)
        got = load_targets_file(tmp_path / "t.txt")
        assert got.dtype.kind == expected.dtype.kind and np.array_equal(got, expected)


def test_label_free_needs_no_targets(data, tmp_path, capsys):
    x, _ = data
    np.save(tmp_path / "feats.npy", x)
    code, out, _ = _run(
        capsys,
        ["--embeddings", str(tmp_path / "feats.npy"), "--k", "2", "--task", "label_free", "--json"],
    )
    assert code == 0 and json.loads(out)["task"] == "label_free"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--embeddings", "missing.npz", "--k", "2"], "embeddings file not found"),
        (["--embeddings", "FEATS", "--model", "m", "--dataset", "d", "--k", "2"], "not both"),
        (["--k", "2"], "give --model and --dataset"),
        (["--embeddings", "FEATS", "--k", "2"], "holds no targets"),
        (["--embeddings", "TWO", "--k", "2"], "cannot tell which entry"),
        (["--embeddings", "FEATS", "--targets", "SHORT", "--k", "2"], "150"),
    ],
)
def test_bad_input_is_a_clear_error(data, tmp_path, capsys, argv, message):
    x, y = data
    np.save(tmp_path / "feats.npy", x)
    np.savez(tmp_path / "two.npz", a=x, b=x)
    np.save(tmp_path / "short.npy", y[:10])
    names = {
        "FEATS": tmp_path / "feats.npy",
        "TWO": tmp_path / "two.npz",
        "SHORT": tmp_path / "short.npy",
    }
    argv = [str(names.get(a, a)) for a in argv]
    code, _, err = _run(capsys, argv)
    assert code == 2 and message in err


def test_warnings_are_one_plain_line_on_stderr(tmp_path, capsys):
    g = np.random.default_rng(0)
    np.savez(
        tmp_path / "noise.npz", embeddings=g.normal(size=(40, 3, 60)), targets=np.arange(40) % 2
    )
    code, _, err = _run(capsys, ["--embeddings", str(tmp_path / "noise.npz"), "--k", "2"])
    assert code == 0
    assert "loes: LOESWarning: no layer explains the targets out of sample" in err
    assert "_cli.py" not in err  # no source excerpt


def test_k_auto_on_the_command_line_prints_the_estimate(data, tmp_path, capsys):
    x, y = data
    path = tmp_path / "feats.npz"
    np.savez(path, embeddings=x, targets=y)
    code, out, _ = _run(capsys, ["--embeddings", str(path), "--k", "auto", "--json"])
    assert code == 0
    printed = json.loads(out)
    api = select_layers_from_custom_embeddings(x, y, k="auto", show_progress=False)
    assert printed["selected_layers"] == api.selected_layers
    assert printed["config"]["k_auto"]["chosen"] == api.config["k_auto"]["chosen"]
    assert printed["estimate"]["mean"]["selected"] == pytest.approx(api.estimate.mean["selected"])
    code, out, _ = _run(capsys, ["--embeddings", str(path), "--k", "auto"])
    assert "verdict: layers" in out
