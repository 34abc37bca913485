"""The CLI's contract under bad input: one line on stderr, exit code 2, no traceback.

Each row of ``CASES`` is a bad or odd invocation of ``loes`` with the files it
needs; the command must exit with the given code and write exactly one
non-empty line on stderr, ``loes <command>: error: ...``, holding a stable
fragment of the message, and never a traceback. The CLI runs in-process
(``loes.cli.main``) except for a few console-script runs at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import planted, run_python

import loes.cli.profile as cli_profile
import loes.cli.report as cli_report
import loes.cli.select as cli_select
from loes import select_layers_from_custom_embeddings
from loes.cli import main
from loes.result import LOESResult

N, L, D = 60, 4, 8


def _feats() -> np.ndarray:
    return planted(N, D, informative=(2,), n_layers=L, seed=3)[0]


def _labels() -> np.ndarray:
    return planted(N, D, informative=(2,), n_layers=L, seed=3)[1]


def _write(text: str, encoding: str = "utf-8") -> Callable[[Path], None]:
    return lambda p: p.write_bytes(text.encode(encoding))


def _npy(array: Callable[[], np.ndarray], **kw) -> Callable[[Path], None]:
    return lambda p: np.save(p, array(), **kw)


class _NotATensor:  # a pickled class: torch.load(weights_only=True) must refuse it
    pass


def _result_json(p: Path) -> None:
    x, y = _feats(), _labels()
    p.write_text(select_layers_from_custom_embeddings(x, y, k=2, show_progress=False).to_json())


def _truncated_npy(p: Path) -> None:
    np.save(p, _feats())
    p.write_bytes(p.read_bytes()[:200])


_BERT: dict[str, Path] = {}


def _tiny_bert(p: Path) -> None:
    """A tiny random BERT (config and weights, no tokenizer), built once per session and copied."""
    if "dir" not in _BERT:
        transformers = pytest.importorskip("transformers")
        cfg = transformers.BertConfig(
            vocab_size=50,
            hidden_size=8,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=32,
        )
        torch.manual_seed(0)
        _BERT["dir"] = Path(tempfile.mkdtemp(prefix="loes-tiny-bert-"))
        with contextlib.redirect_stderr(io.StringIO()):  # save_pretrained's progress bar
            transformers.BertModel(cfg).save_pretrained(str(_BERT["dir"]))
    shutil.copytree(_BERT["dir"], p)


def _titles_csv(p: Path) -> None:
    p.write_text("headline,topic\n" + "".join(f"headline number {i},{i % 2}\n" for i in range(12)))


#: Files a case may ask for, by name: builder(path).
FILES: dict[str, Callable[[Path], None]] = {
    "feats.npy": _npy(_feats),
    "labels.txt": _write("\n".join(map(str, _labels())) + "\n"),
    "feats.npz": lambda p: np.savez(p, embeddings=_feats(), targets=_labels()),
    "two.npz": lambda p: np.savez(p, a=_feats(), b=_feats()),
    "garbage.npy": _write("this is not numpy"),
    "garbage.npz": _write("PK not a zip"),
    "garbage.safetensors": lambda p: p.write_bytes(b"\xff" * 40),
    "garbage.pt": _write("not a torch file"),
    "code.pt": lambda p: torch.save({"embeddings": _NotATensor()}, p),
    "list.pt": lambda p: torch.save([1, 2, 3], p),
    "pickled.npy": lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True),
    "objects.npz": lambda p: np.savez(p, embeddings=np.array([None, 1], dtype=object)),
    "truncated.npy": _truncated_npy,
    "archive.npy": lambda p: (
        np.savez(p.with_suffix(".npz"), a=_feats()),
        p.with_suffix(".npz").rename(p),
    ),
    "flat.npy": _npy(lambda: _feats()[:, 0, :]),
    "complex.npy": _npy(lambda: _feats().astype(np.complex64)),
    "strings.npy": _npy(lambda: np.full((N, L, D), "a")),
    "nan.npy": _npy(lambda: np.where(np.arange(N * L * D).reshape(N, L, D) == 5, np.nan, _feats())),
    "tiny.npy": _npy(lambda: _feats()[:2]),
    "three_layers.npy": _npy(lambda: _feats()[:, :3]),
    "feats.csv": _write("1,2\n3,4\n"),
    "latin1.txt": _write("caf\xe9\n" * N, encoding="latin-1"),
    "empty.txt": _write(""),
    "gap.txt": _write("0\n1\n\n1\n"),
    "short.npy": _npy(lambda: _labels()[:10]),
    "idname.csv": _write("id,name\n" + "".join(f"{i},x{i}\n" for i in range(N))),
    "ragged.csv": _write("id,label\n0,1\n1\n"),
    "bad.json": _write("{not json"),
    "list.json": _write("[1, 2, 3]"),
    "keys.json": _write('{"a": 1}'),
    "latin1.json": _write('{"caf\xe9": 1}', encoding="latin-1"),
    "labels.xlsx": _write("x"),
    "result.json": _result_json,
    "adir": lambda p: p.mkdir(),
    "afile": _write("x"),
    "empty_model": lambda p: p.mkdir(),
    "tiny_bert": _tiny_bert,
    "titles.csv": _titles_csv,
    "titles.txt": _write("a\nb\n"),
}

E, T, R = "feats.npy", "labels.txt", "result.json"
SEL = [
    "select",
    "--embeddings",
    E,
    "--targets",
    T,
]  # a good --embeddings run, to spoil with one option
MOD = [
    "select",
    "--model",
    "tiny_bert",
    "--dataset",
    "titles.csv",
    "--k",
    "1",
]  # good until loading

# (id, argv, files to create, exit code, stable fragment of the one stderr line)
CASES = [
    # select --embeddings: options
    ("sel-k0", SEL + ["--k", "0"], (E, T), 2, "--k: must be a positive integer; got 0"),
    ("sel-k-negative", SEL + ["--k", "-1"], (E, T), 2, "must be a positive integer; got -1"),
    ("sel-k-word", SEL + ["--k", "two"], (E, T), 2, "must be a positive integer; got 'two'"),
    ("sel-k-missing", SEL, (E, T), 2, "the following arguments are required: --k"),
    ("sel-k-too-big", SEL + ["--k", "9"], (E, T), 2, "k"),
    (
        "sel-unknown-option",
        SEL + ["--k", "2", "--kk", "2"],
        (E, T),
        2,
        "unrecognized arguments: --kk",
    ),
    (
        "sel-bad-task",
        SEL + ["--k", "2", "--task", "ranking"],
        (E, T),
        2,
        "invalid choice: 'ranking'",
    ),
    (
        "sel-reg-nan",
        SEL + ["--k", "2", "--reg", "nan"],
        (E, T),
        2,
        "must be a finite number; got 'nan'",
    ),
    ("sel-alpha-inf", SEL + ["--k", "2", "--alpha", "inf"], (E, T), 2, "must be a finite number"),
    ("sel-reg-word", SEL + ["--k", "2", "--reg", "big"], (E, T), 2, "must be a number; got 'big'"),
    ("sel-both-modes", SEL + ["--k", "2", "--model", "m", "--dataset", "d"], (E, T), 2, "not both"),
    ("sel-no-mode", ["select", "--k", "2"], (), 2, "missing --model"),
    (
        "sel-model-option",
        SEL + ["--k", "2", "--device", "cpu"],
        (E, T),
        2,
        "--device apply to --model/--dataset only",
    ),
    # select --embeddings: embeddings files
    (
        "sel-emb-missing",
        ["select", "--embeddings", "nope.npz", "--k", "2"],
        (),
        2,
        "embeddings file not found",
    ),
    ("sel-emb-dir", ["select", "--embeddings", "adir", "--k", "2"], ("adir",), 2, "is a directory"),
    (
        "sel-emb-garbage-npy",
        ["select", "--embeddings", "garbage.npy", "--targets", T, "--k", "2"],
        ("garbage.npy", T),
        2,
        "not a .npy file (no NumPy header)",
    ),
    (
        "sel-emb-pickled-npy",
        ["select", "--embeddings", "pickled.npy", "--targets", T, "--k", "2"],
        ("pickled.npy", T),
        2,
        "pickled Python objects",
    ),
    (
        "sel-emb-truncated-npy",
        ["select", "--embeddings", "truncated.npy", "--targets", T, "--k", "2"],
        ("truncated.npy", T),
        2,
        "not a readable .npy file",
    ),
    (
        "sel-emb-npz-as-npy",
        ["select", "--embeddings", "archive.npy", "--targets", T, "--k", "2"],
        ("archive.npy", T),
        2,
        "is an .npz archive",
    ),
    (
        "sel-emb-garbage-npz",
        ["select", "--embeddings", "garbage.npz", "--k", "2"],
        ("garbage.npz",),
        2,
        "not a readable .npz archive",
    ),
    (
        "sel-emb-object-npz",
        ["select", "--embeddings", "objects.npz", "--k", "2"],
        ("objects.npz",),
        2,
        "not a readable .npz archive",
    ),
    (
        "sel-emb-garbage-safetensors",
        ["select", "--embeddings", "garbage.safetensors", "--k", "2"],
        ("garbage.safetensors",),
        2,
        "not a readable safetensors file",
    ),
    (
        "sel-emb-garbage-pt",
        ["select", "--embeddings", "garbage.pt", "--k", "2"],
        ("garbage.pt",),
        2,
        "not a readable torch file",
    ),
    (
        "sel-emb-code-pt",
        ["select", "--embeddings", "code.pt", "--k", "2"],
        ("code.pt",),
        2,
        "weights_only=True",
    ),
    (
        "sel-emb-list-pt",
        ["select", "--embeddings", "list.pt", "--k", "2"],
        ("list.pt",),
        2,
        "expected a tensor or a dict of tensors; found list",
    ),
    (
        "sel-emb-2d",
        ["select", "--embeddings", "flat.npy", "--targets", T, "--k", "2"],
        ("flat.npy", T),
        2,
        "for a single layer save X[:, None, :]",
    ),
    (
        "sel-emb-complex",
        ["select", "--embeddings", "complex.npy", "--targets", T, "--k", "2"],
        ("complex.npy", T),
        2,
        "embeddings must be real numbers",
    ),
    (
        "sel-emb-strings",
        ["select", "--embeddings", "strings.npy", "--targets", T, "--k", "2"],
        ("strings.npy", T),
        2,
        "embeddings must be real numbers",
    ),
    (
        "sel-emb-nan",
        ["select", "--embeddings", "nan.npy", "--targets", T, "--k", "2"],
        ("nan.npy", T),
        2,
        "NaN/Inf",
    ),
    (
        "sel-emb-two-samples",
        ["select", "--embeddings", "tiny.npy", "--task", "label_free", "--k", "1"],
        ("tiny.npy",),
        2,
        "at least 3 calibration samples",
    ),
    (
        "sel-emb-csv",
        ["select", "--embeddings", "feats.csv", "--k", "2"],
        ("feats.csv",),
        2,
        "unsupported file type '.csv'",
    ),
    (
        "sel-emb-ambiguous",
        ["select", "--embeddings", "two.npz", "--k", "2"],
        ("two.npz",),
        2,
        "cannot tell which entry",
    ),
    (
        "sel-emb-key-missing",
        ["select", "--embeddings", "two.npz", "--embeddings-key", "zz", "--k", "2"],
        ("two.npz",),
        2,
        "no entry 'zz'",
    ),
    ("sel-emb-no-targets", ["select", "--embeddings", E, "--k", "2"], (E,), 2, "holds no targets"),
    # select --embeddings: targets files
    (
        "sel-tgt-missing",
        ["select", "--embeddings", E, "--targets", "nope.txt", "--k", "2"],
        (E,),
        2,
        "targets file not found",
    ),
    (
        "sel-tgt-latin1",
        ["select", "--embeddings", E, "--targets", "latin1.txt", "--k", "2"],
        (E, "latin1.txt"),
        2,
        "not UTF-8 text",
    ),
    (
        "sel-tgt-empty",
        ["select", "--embeddings", E, "--targets", "empty.txt", "--k", "2"],
        (E, "empty.txt"),
        2,
        "the file is empty",
    ),
    (
        "sel-tgt-gap",
        ["select", "--embeddings", E, "--targets", "gap.txt", "--k", "2"],
        (E, "gap.txt"),
        2,
        "line 3 has no value",
    ),
    (
        "sel-tgt-short",
        ["select", "--embeddings", E, "--targets", "short.npy", "--k", "2"],
        (E, "short.npy"),
        2,
        "10",
    ),
    (
        "sel-tgt-two-columns",
        ["select", "--embeddings", E, "--targets", "idname.csv", "--k", "2"],
        (E, "idname.csv"),
        2,
        "pass --targets-column NAME",
    ),
    (
        "sel-tgt-column-missing",
        [
            "select",
            "--embeddings",
            E,
            "--targets",
            "idname.csv",
            "--targets-column",
            "zz",
            "--k",
            "2",
        ],
        (E, "idname.csv"),
        2,
        "no column 'zz'",
    ),
    (
        "sel-tgt-ragged",
        ["select", "--embeddings", E, "--targets", "ragged.csv", "--k", "2"],
        (E, "ragged.csv"),
        2,
        "line 3 has 1 fields",
    ),
    (
        "sel-tgt-bad-json",
        ["select", "--embeddings", E, "--targets", "bad.json", "--k", "2"],
        (E, "bad.json"),
        2,
        "not valid JSON",
    ),
    (
        "sel-tgt-json-keys",
        ["select", "--embeddings", E, "--targets", "keys.json", "--k", "2"],
        (E, "keys.json"),
        2,
        "no targets entry",
    ),
    (
        "sel-tgt-xlsx",
        ["select", "--embeddings", E, "--targets", "labels.xlsx", "--k", "2"],
        (E, "labels.xlsx"),
        2,
        "unsupported targets file type '.xlsx'",
    ),
    (
        "sel-tgt-npz-no-entry",
        ["select", "--embeddings", E, "--targets", "two.npz", "--k", "2"],
        (E, "two.npz"),
        2,
        "no targets entry",
    ),
    # select: output paths (checked before any work)
    ("sel-out-dir", SEL + ["--k", "2", "--output", "adir"], (E, T, "adir"), 2, "is a folder"),
    ("sel-out-slash", SEL + ["--k", "2", "--output", "new/"], (E, T), 2, "is a folder"),
    (
        "sel-out-parent-file",
        SEL + ["--k", "2", "--output", "afile/r.json"],
        (E, T, "afile"),
        2,
        "is a file, not a folder",
    ),
    # select --model: everything cheap fails before any load
    (
        "mod-missing-folder",
        ["select", "--model", "./no-such-model", "--dataset", "titles.csv", "--k", "1"],
        ("titles.csv",),
        2,
        "--model ./no-such-model: no such file or folder",
    ),
    (
        "mod-missing-abs",
        ["select", "--model", "/nonexistent/a/model", "--dataset", "titles.csv", "--k", "1"],
        ("titles.csv",),
        2,
        "no such file or folder",
    ),
    (
        "mod-missing-dataset",
        ["select", "--model", "tiny_bert", "--dataset", "gone.csv", "--k", "1"],
        ("tiny_bert",),
        2,
        "--dataset gone.csv: no such file or folder",
    ),
    (
        "mod-no-dataset",
        ["select", "--model", "tiny_bert", "--k", "1"],
        ("tiny_bert",),
        2,
        "missing --dataset",
    ),
    (
        "mod-no-model",
        ["select", "--dataset", "titles.csv", "--k", "1"],
        ("titles.csv",),
        2,
        "missing --model",
    ),
    (
        "mod-batch0",
        MOD + ["--batch-size", "0"],
        ("tiny_bert", "titles.csv"),
        2,
        "--batch-size: must be a positive integer; got 0",
    ),
    (
        "mod-max-length0",
        MOD + ["--max-length", "0"],
        ("tiny_bert", "titles.csv"),
        2,
        "positive integer",
    ),
    (
        "mod-max-samples-neg",
        MOD + ["--max-samples", "-3"],
        ("tiny_bert", "titles.csv"),
        2,
        "integer >= 0",
    ),
    (
        "mod-device-bad",
        MOD + ["--device", "banana"],
        ("tiny_bert", "titles.csv"),
        2,
        "not a device name",
    ),
    (
        "mod-dtype-bad",
        MOD + ["--dtype", "float8"],
        ("tiny_bert", "titles.csv"),
        2,
        "invalid choice: 'float8'",
    ),
    (
        "mod-targets",
        MOD + ["--targets", T],
        ("tiny_bert", "titles.csv", T),
        2,
        "apply to --embeddings only",
    ),
    (
        "mod-cache-file",
        MOD + ["--cache-dir", "afile"],
        ("tiny_bert", "titles.csv", "afile"),
        2,
        "is a file, not a folder",
    ),
    (
        "mod-out-parent-file",
        MOD + ["--output", "afile/x.json"],
        ("tiny_bert", "titles.csv", "afile"),
        2,
        "is a file, not a folder",
    ),
    (
        "mod-packaged-unknown",
        ["select", "--model", "tiny_bert", "--dataset", "loes:nope", "--k", "1", "--device", "cpu"],
        ("tiny_bert",),
        2,
        "unknown packaged dataset",
    ),
    (
        "mod-dataset-txt",
        [
            "select",
            "--model",
            "tiny_bert",
            "--dataset",
            "titles.txt",
            "--k",
            "1",
            "--device",
            "cpu",
        ],
        ("tiny_bert", "titles.txt"),
        2,
        "cannot read",
    ),
    (
        "mod-empty-folder",
        ["select", "--model", "empty_model", "--dataset", "titles.csv", "--k", "1"],
        ("empty_model", "titles.csv"),
        2,
        "the folder has no config.json",
    ),
    (
        "mod-gguf-missing",
        [
            "select",
            "--model",
            "empty_model",
            "--gguf-file",
            "m.gguf",
            "--dataset",
            "titles.csv",
            "--k",
            "1",
        ],
        ("empty_model", "titles.csv"),
        2,
        "the folder has no m.gguf",
    ),
    (
        "mod-no-target-column",
        [
            "select",
            "--model",
            "tiny_bert",
            "--dataset",
            "titles.csv",
            "--k",
            "1",
            "--device",
            "cpu",
        ],
        ("tiny_bert", "titles.csv"),
        2,
        "no target column found",
    ),
    # profile
    ("prof-nothing", ["profile"], (), 2, "either an embeddings file"),
    (
        "prof-both",
        ["profile", E, "--model", "tiny_bert"],
        (E, "tiny_bert"),
        2,
        "either an embeddings file",
    ),
    (
        "prof-model-no-dataset",
        ["profile", "--model", "tiny_bert"],
        ("tiny_bert",),
        2,
        "--model needs --dataset",
    ),
    (
        "prof-metric-unknown",
        ["profile", E, "--metrics", "vibes"],
        (E,),
        2,
        "unknown metric 'vibes'",
    ),
    (
        "prof-metric-typo",
        ["profile", E, "--metrics", "isotropi"],
        (E,),
        2,
        "did you mean 'isotropy'",
    ),
    (
        "prof-views-1",
        ["profile", "--model", "tiny_bert", "--dataset", "titles.csv", "--views", "1"],
        ("tiny_bert", "titles.csv"),
        2,
        "--views must be 0",
    ),
    ("prof-views-file-mode", ["profile", E, "--views", "2"], (E,), 2, "go with --model"),
    ("prof-one-view-file", ["profile", E, "--view-files", E], (E,), 2, "at least 2 files"),
    ("prof-plot-dir", ["profile", E, "--plot", "adir"], (E, "adir"), 2, "is a folder"),
    (
        "prof-plot-suffix",
        ["profile", E, "--plot", "p.txt"],
        (E,),
        2,
        "unsupported file type '.txt'",
    ),
    (
        "prof-plot-parent-file",
        ["profile", E, "--plot", "afile/p.png"],
        (E, "afile"),
        2,
        "is a file, not a folder",
    ),
    ("prof-alpha0", ["profile", E, "--alpha", "0"], (E,), 2, "must be a number > 0"),
    ("prof-alpha-nan", ["profile", E, "--alpha", "nan"], (E,), 2, "finite"),
    ("prof-garbage-pt", ["profile", "garbage.pt"], ("garbage.pt",), 2, "not a readable torch file"),
    ("prof-missing", ["profile", "nope.npy"], (), 2, "embeddings file not found"),
    ("prof-2d", ["profile", "flat.npy"], ("flat.npy",), 2, "for a single layer"),
    (
        "prof-batch0",
        ["profile", "--model", "tiny_bert", "--dataset", "titles.csv", "--batch-size", "0"],
        ("tiny_bert", "titles.csv"),
        2,
        "positive integer",
    ),
    (
        "prof-model-missing",
        ["profile", "--model", "./gone", "--dataset", "titles.csv"],
        ("titles.csv",),
        2,
        "no such file or folder",
    ),
    # report
    ("rep-missing", ["report", "nope.json"], (), 2, "LOESResult file not found"),
    (
        "rep-bad-json",
        ["report", "bad.json"],
        ("bad.json",),
        2,
        "not valid JSON (Expecting property name",
    ),
    ("rep-list", ["report", "list.json"], ("list.json",), 2, "holds an object; found a list"),
    ("rep-wrong-keys", ["report", "keys.json"], ("keys.json",), 2, "not LOESResult JSON"),
    ("rep-latin1", ["report", "latin1.json"], ("latin1.json",), 2, "not UTF-8 text"),
    ("rep-no-result", ["report"], (), 2, "the following arguments are required: result"),
    (
        "rep-eval-bad",
        ["report", R, "--evaluation", "bad.json"],
        (R, "bad.json"),
        2,
        "not valid JSON",
    ),
    (
        "rep-eval-keys",
        ["report", R, "--evaluation", "keys.json"],
        (R, "keys.json"),
        2,
        "not EvaluationResult JSON",
    ),
    (
        "rep-out-file",
        ["report", R, "--output", "afile"],
        (R, "afile"),
        2,
        "is a file, not a folder",
    ),
    (
        "rep-emb-garbage",
        ["report", R, "--embeddings", "garbage.npy", "--output", "o"],
        (R, "garbage.npy"),
        2,
        "not a .npy file",
    ),
    (
        "rep-emb-layers",
        ["report", R, "--embeddings", "three_layers.npy", "--output", "o"],
        (R, "three_layers.npy"),
        2,
        "has 3 layers, the result",
    ),
    # demo (all fail before any model is loaded)
    ("demo-k0", ["demo", "--k", "0"], (), 2, "--k: must be a positive integer"),
    ("demo-k-too-big", ["demo", "--k", "7", "--output", "o"], (), 2, "the model has 6 layers"),
    ("demo-seeds0", ["demo", "--seeds", "0"], (), 2, "--seeds: must be a positive integer"),
    ("demo-task", ["demo", "--task", "imdb"], (), 2, "invalid choice: 'imdb'"),
    ("demo-probe", ["demo", "--probe", "svm"], (), 2, "invalid choice: 'svm'"),
    ("demo-max-samples0", ["demo", "--max-samples", "0"], (), 2, "positive integer"),
    ("demo-out-file", ["demo", "--output", "afile"], ("afile",), 2, "is a file, not a folder"),
    (
        "demo-model-missing",
        ["demo", "--model", "./gone", "--output", "o"],
        (),
        2,
        "no such file or folder",
    ),
    # the top level
    ("top-unknown-command", ["selekt"], (), 2, "invalid choice: 'selekt'"),
    ("top-no-command", [], (), 2, "no command given; choose one of select, profile, demo, report"),
    ("top-verbose-only", ["-v"], (), 2, "no command given"),
]


def _materialise(tmp_path: Path, files, argv):
    for name in files:
        FILES[name](tmp_path / name)
    return [str(tmp_path / a) if (tmp_path / a).exists() or a in FILES else a for a in argv]


#: A progress bar's redraw (transformers' "Loading weights" bar), not a message.
PROGRESS = re.compile(r"\[[^\]]*(/s|s/it)\]\s*$")


def _one_error_line(err: str, command: str, fragment: str) -> None:
    assert "Traceback" not in err, err
    lines = [
        line
        for line in err.splitlines()
        if line.strip() and not line.startswith("loes: LOESWarning") and not PROGRESS.search(line)
    ]
    assert len(lines) == 1, err
    assert (
        lines[0].startswith(f"loes {command}: error: ") if command else lines[0].startswith("loes")
    ), err
    assert fragment in lines[0], err


@pytest.mark.parametrize(
    "argv, files, code, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_invocation_is_one_clear_line(
    tmp_path, monkeypatch, capsys, argv, files, code, fragment
):
    monkeypatch.chdir(tmp_path)
    if "cuda" in argv and torch.cuda.is_available():  # pragma: no cover
        pytest.skip("this machine has CUDA")
    argv = _materialise(tmp_path, files, argv)
    got = main(argv)
    err = capsys.readouterr().err
    command = argv[0] if argv and argv[0] in ("select", "profile", "demo", "report") else ""
    assert got == code, err
    _one_error_line(err, command, fragment)


def test_case_table_is_large_and_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) >= 60 and len(set(ids)) == len(ids)
    assert {c[1][0] for c in CASES if c[1]} >= {"select", "profile", "report", "demo"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["select", "profile"])
def test_cuda_without_cuda_fails_before_loading(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    # an empty model folder: anything but the device check first would fail differently
    argv = _materialise(
        tmp_path,
        ("empty_model", "titles.csv"),
        [command, "--model", "empty_model", "--dataset", "titles.csv", "--device", "cuda"],
    )
    assert main(argv + (["--k", "1"] if command == "select" else [])) == 2
    _one_error_line(capsys.readouterr().err, argv[0], "CUDA is not available")


# -------------------------------------------------------------- no lost work, checks first
def _spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def record(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, record)
    return calls


@pytest.mark.parametrize(
    "argv, module, name",
    [
        (
            SEL + ["--k", "2", "--output", "afile/r.json"],
            cli_select,
            "select_layers_from_custom_embeddings",
        ),
        (SEL + ["--k", "2", "--output", "adir"], cli_select, "load_embeddings_file"),
        (MOD + ["--output", "afile/r.json"], cli_select, "select_layers_from_hf_id"),
        (["profile", E, "--plot", "afile/p.png"], cli_profile, "profile"),
        (["profile", E, "--plot", "p.gif"], cli_profile, "load_embeddings_file"),
        (["report", R, "--embeddings", E, "--output", "afile"], cli_report, "load_embeddings_file"),
    ],
    ids=["select-emb", "select-read", "select-model", "profile", "profile-read", "report"],
)
def test_output_path_is_checked_before_any_work(tmp_path, monkeypatch, capsys, argv, module, name):
    monkeypatch.chdir(tmp_path)
    argv = _materialise(tmp_path, (E, T, R, "afile", "adir", "tiny_bert", "titles.csv"), argv)
    calls = _spy(monkeypatch, module, name)
    t0 = time.perf_counter()
    assert main(argv) == 2
    assert calls == [] and time.perf_counter() - t0 < 5
    assert "Traceback" not in capsys.readouterr().err


def test_a_failed_write_prints_the_result_instead(tmp_path, monkeypatch, capsys):
    """The folder is creatable when checked, then becomes a file: the result still reaches stdout."""
    monkeypatch.chdir(tmp_path)
    argv = _materialise(tmp_path, (E, T), SEL + ["--k", "2", "--output", "sub/r.json"])
    real = cli_select.select_layers_from_custom_embeddings

    def select_then_spoil(*args, **kwargs):
        result = real(*args, **kwargs)
        (tmp_path / "sub").write_text("now a file")
        return result

    monkeypatch.setattr(cli_select, "select_layers_from_custom_embeddings", select_then_spoil)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    _one_error_line(err, "select", "the result follows on stdout")
    assert (
        LOESResult.from_dict(json.loads(out)).selected_layers
        == real(_feats(), _labels(), k=2, show_progress=False).selected_layers
    )


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = _materialise(tmp_path, (E, T), SEL + ["--k", "2"])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_select, "select_layers_from_custom_embeddings", interrupted)
    assert main(argv) == 130
    _one_error_line(capsys.readouterr().err, "select", "interrupted")


def test_a_bug_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = _materialise(tmp_path, (E, T), SEL + ["--k", "2"])

    def broken(*args, **kwargs):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(cli_select, "select_layers_from_custom_embeddings", broken)
    assert main(argv) == 1
    _one_error_line(
        capsys.readouterr().err,
        "select",
        "unexpected TypeError: unsupported operand; this is a bug",
    )


# -------------------------------------------------------------- the one file reader
@pytest.mark.parametrize(
    "name, text",
    [
        ("ids.csv", "id,label\n" + "".join(f"{i},{v}\n" for i, v in enumerate(_labels()))),
        (
            "texts.csv",
            "text,Label\n" + "".join(f'"a, text {i}",{v}\n' for i, v in enumerate(_labels())),
        ),
        ("col.tsv", "rating\tid\n" + "".join(f"{v}\t{i}\n" for i, v in enumerate(_labels()))),
        ("header.csv", "label\n" + "".join(f"{v}\n" for v in _labels())),
        ("labels.json", json.dumps([int(v) for v in _labels()])),
    ],
    ids=["id-label", "text-Label-quoted", "tsv-column", "one-column-header", "json-list"],
)
def test_every_targets_format_gives_the_same_selection(tmp_path, capsys, name, text):
    np.save(tmp_path / E, _feats())
    (tmp_path / name).write_text(text)
    argv = [
        "select",
        "--embeddings",
        str(tmp_path / E),
        "--targets",
        str(tmp_path / name),
        "--k",
        "2",
        "--json",
    ]
    if name == "col.tsv":
        argv += ["--targets-column", "rating"]
    assert main(argv) == 0
    printed = json.loads(
        capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON")
    )
    api = select_layers_from_custom_embeddings(_feats(), _labels(), k=2, show_progress=False)
    assert printed["selected_layers"] == api.selected_layers


def test_profile_and_report_read_the_same_formats(tmp_path, capsys):
    x = _feats()
    np.savez(tmp_path / "f.npz", embeddings=x, targets=_labels())
    assert main(["profile", str(tmp_path / "f.npz"), "--metrics", "isotropy", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["values"]["isotropy"]) == L


# -------------------------------------------------------------- the console script
def _console(args, cwd):
    exe = shutil.which("loes")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "loes.cli", *args]
    env = {**os.environ, "PYTHONPATH": str(Path(cli_select.__file__).parents[2])}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


@pytest.mark.parametrize(
    "argv, files, fragment",
    [
        (
            ["select", "--embeddings", "garbage.npy", "--k", "2"],
            ("garbage.npy",),
            "not a .npy file",
        ),
        (["profile", E, "--batch-size", "0"], (E,), "--batch-size: must be a positive integer"),
    ],
    ids=["select-file", "profile-option"],
)
def test_console_script(tmp_path, argv, files, fragment):
    argv = _materialise(tmp_path, files, argv)
    run = _console(argv, tmp_path)
    assert run.returncode == 2, run.stderr
    _one_error_line(run.stderr, argv[0], fragment)


def test_verbose_logs_the_traceback(tmp_path):
    FILES["bad.json"](tmp_path / "bad.json")
    run = _console(["report", "bad.json", "-v"], tmp_path)
    assert run.returncode == 2
    assert "Traceback" in run.stderr and run.stderr.strip().splitlines()[-1].startswith(
        "loes report: error:"
    )


def test_the_cli_imports_no_heavy_package():
    code = (
        "import sys, loes.cli; print(sorted(m for m in ('transformers', 'datasets', 'matplotlib', "
        "'sklearn', 'scipy', 'pandas') if m in sys.modules))"
    )
    assert run_python(code).stdout.strip() == "[]"
