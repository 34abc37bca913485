"""loes.hf.export_features: every row of a dataset to a feature store, equal to
extract_embeddings row for row; resumable; settings-checked; streams; the CLI."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import loes.cli.extract as cli_extract  # noqa: E402
from loes import LOESError  # noqa: E402
from loes.cli import main  # noqa: E402
from loes.datasets import load_drugreview, minilm_path  # noqa: E402
from loes.hf import export as X  # noqa: E402
from loes.hf import export_features, extract_embeddings, load_embeddings  # noqa: E402
from loes.store import load_features  # noqa: E402

N_ROWS = 40
QUIET = dict(show_progress=False)


@pytest.fixture(scope="module")
def rows():
    ds = load_drugreview("test").select(range(N_ROWS))
    return datasets.Dataset.from_dict(
        {"text": [t[:160] for t in ds["text"]], "label": list(ds["label"])}
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random BERT (3 blocks x 32) with MiniLM's tokenizer, saved to a folder."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        num_hidden_layers=3,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=30522,
        max_position_embeddings=128,
    )
    folder = tmp_path_factory.mktemp("tiny-bert")
    model = transformers.BertModel(cfg).eval()
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    with contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return str(folder), model, tok


def _assert_same_store(a, b, atol=1e-5):
    xa, ya = a.load()
    xb, yb = b.load()
    assert a.layers == b.layers and len(a) == len(b)
    torch.testing.assert_close(xa, xb, atol=atol, rtol=1e-5)
    np.testing.assert_array_equal(ya, yb)


def test_store_equals_extract_embeddings_on_a_layer_subset(tiny, rows, tmp_path):
    folder, _, _ = tiny
    store = export_features(folder, rows, tmp_path / "s", layers=[0, 2], shard_rows=16, **QUIET)
    twin = extract_embeddings(folder, rows, max_samples=None, layers=[0, 2], **QUIET)
    x, y = store.load()
    assert len(store) == N_ROWS and store.layers == [0, 2]
    assert store.labels == ["0 (hidden_states[1])", "2 (hidden_states[3])"]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "manifest.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "shard-00002.safetensors",
    ]
    assert store.info["computed"] == [0, 1, 2] and store.plan["pooling"] == twin.pooling == "cls"
    torch.testing.assert_close(x, twin.embeddings, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(y, twin.targets)
    np.testing.assert_array_equal(y, np.asarray(rows["label"]))
    _, _, idx = next(store.batches(64, with_indices=True))
    np.testing.assert_array_equal(idx, np.arange(N_ROWS))
    emb = load_embeddings(tmp_path / "s", layers=[2])
    assert emb.layer_names == ["hidden_states[3]"] and emb.pooling == "cls"
    torch.testing.assert_close(emb.embeddings[:, 0], twin.embeddings[:, 1], atol=1e-5, rtol=0)


def test_minilm_store_equals_extract_embeddings(tmp_path):
    data = load_drugreview("test").select(range(24))
    store = export_features(minilm_path(), data, tmp_path, layers="1,4", shard_rows=10, **QUIET)
    twin = extract_embeddings(minilm_path(), data, max_samples=None, layers=[1, 4], **QUIET)
    x, y = store.load()
    assert store.layers == [1, 4] and store.plan["pooling"] == "masked_mean"
    torch.testing.assert_close(x, twin.embeddings, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(y, twin.targets)


def _counting(monkeypatch):
    """Count the rows each extraction call gets (the probe is one row)."""
    calls: list[int] = []
    real = X.E.extract_embeddings

    def counted(model, data, **kw):
        calls.append(len(data))
        return real(model, data, **kw)

    monkeypatch.setattr(X.E, "extract_embeddings", counted)
    return calls


def test_interrupted_run_resumes_only_the_missing_shards(tiny, rows, tmp_path, monkeypatch):
    _, model, tok = tiny
    full = export_features(model, rows, tmp_path / "full", tokenizer=tok, shard_rows=8, **QUIET)

    def broken():  # the stream fails while the third shard is read
        for i, r in enumerate(rows):
            if i == 20:
                raise RuntimeError("connection lost")
            yield r

    out = tmp_path / "part"
    with pytest.raises(RuntimeError, match="connection lost"):
        export_features(model, broken(), out, tokenizer=tok, shard_rows=8, **QUIET)
    assert sorted(p.name for p in out.iterdir()) == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]  # complete shards only: no manifest, no temporary file
    with pytest.raises(LOESError, match="did not finish"):
        load_features(out)
    calls = _counting(monkeypatch)
    store = export_features(model, rows, out, tokenizer=tok, shard_rows=8, **QUIET)
    assert store.info["computed"] == [2, 3, 4] and calls == [1, 8, 8, 8]
    _assert_same_store(store, full)
    calls.clear()
    again = export_features(model, rows, out, tokenizer=tok, shard_rows=8, **QUIET)
    assert again.info["computed"] == [] and calls == [1]
    assert model.training is False and next(model.parameters()).device.type == "cpu"


def test_a_failing_shard_leaves_the_others_and_the_rerun_finishes(
    tiny, rows, tmp_path, monkeypatch
):
    _, model, tok = tiny
    real = X.ShardJob.run

    def fail_on_3(self, m, r, shard):
        if shard == 3:
            raise KeyboardInterrupt
        return real(self, m, r, shard)

    monkeypatch.setattr(X.ShardJob, "run", fail_on_3)
    with pytest.raises(KeyboardInterrupt):
        export_features(model, rows, tmp_path, tokenizer=tok, shard_rows=8, **QUIET)
    monkeypatch.setattr(X.ShardJob, "run", real)
    assert len(list(tmp_path.glob("shard-*"))) == 3 and not (tmp_path / "manifest.json").exists()
    store = export_features(model, rows, tmp_path, tokenizer=tok, shard_rows=8, **QUIET)
    assert store.info["computed"] == [3, 4] and len(store) == N_ROWS


def test_changed_settings_are_refused_unless_overwrite(tiny, rows, tmp_path):
    _, model, tok = tiny
    kw = dict(tokenizer=tok, shard_rows=16, **QUIET)
    export_features(model, rows, tmp_path, pooling="cls", **kw)
    for changed in (dict(pooling="masked_mean"), dict(max_length=16), dict(layers=[1])):
        with pytest.raises(LOESError, match="written with other settings"):
            export_features(model, rows, tmp_path, **{"pooling": "cls", **changed}, **kw)
    mean = export_features(model, rows, tmp_path, pooling="masked_mean", overwrite=True, **kw)
    assert mean.info["computed"] == [0, 1, 2] and mean.plan["pooling"] == "masked_mean"
    twin = extract_embeddings(
        model, rows, tokenizer=tok, max_samples=None, pooling="masked_mean", **QUIET
    )
    torch.testing.assert_close(mean.load()[0], twin.embeddings, atol=1e-5, rtol=1e-5)
    other = rows.map(lambda r, i: {"text": r["text"] + " !" if i == 20 else r["text"]}, True)
    again = export_features(model, other, tmp_path, pooling="masked_mean", **kw)
    assert again.info["computed"] == [1]  # only the shard whose rows changed


def test_streams_give_the_store_of_the_map_style_dataset(tiny, rows, tmp_path):
    _, model, tok = tiny
    kw = dict(tokenizer=tok, shard_rows=16, layers=[1], **QUIET)
    ref = export_features(model, rows, tmp_path / "map", **kw)
    as_dicts = [dict(r) for r in rows]
    for name, stream in (
        ("iterable", rows.to_iterable_dataset()),
        ("generator", (r for r in as_dicts)),
        ("pairs", ((r["text"], r["label"]) for r in as_dicts)),
    ):
        store = export_features(model, stream, tmp_path / name, **kw)
        assert store.info["computed"] == [0, 1, 2], name
        assert store.info["dataset"].startswith("stream["), store.info["dataset"]
        _assert_same_store(store, ref)


def test_bad_arguments_fail_before_any_work(tiny, rows, tmp_path):
    folder, model, tok = tiny
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(LOESError, match="holds other files"):
        export_features(model, rows, tmp_path, tokenizer=tok)
    with pytest.raises(LOESError, match="is a file"):
        export_features(model, rows, tmp_path / "notes.txt", tokenizer=tok)
    with pytest.raises(LOESError, match="shard_rows must be a positive int"):
        export_features(model, rows, tmp_path / "a", tokenizer=tok, shard_rows=0)
    with pytest.raises(LOESError, match="storage_dtype"):
        export_features(model, rows, tmp_path / "a", tokenizer=tok, storage_dtype="int8")
    with pytest.raises(LOESError, match="did you mean 'shard_rows'"):
        export_features(model, rows, tmp_path / "a", shard_row=8)
    with pytest.raises(LOESError, match="out of range|layer"):
        export_features(folder, rows, tmp_path / "a", layers=[7])
    with pytest.raises(LOESError, match="reads rows, not batches"):
        export_features(model, torch.utils.data.DataLoader(rows), tmp_path / "a", tokenizer=tok)
    assert not (tmp_path / "a").exists()


def _run_cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_extract_then_select_on_the_store(tiny, rows, tmp_path, capsys, monkeypatch):
    folder, _, _ = tiny
    data = tmp_path / "rows.csv"
    rows.to_csv(str(data), index=False)
    out = tmp_path / "feats"
    argv = ["extract", folder, str(data), "--output", str(out), "--layers", "0,2"]
    code, stdout, err = _run_cli(argv + ["--shard-rows", "16", "--json"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["rows"] == N_ROWS and summary["layers"] == [0, 2]
    assert summary["computed"] == [0, 1, 2] and summary["shards"] == 3
    twin = extract_embeddings(folder, rows, max_samples=None, layers=[0, 2], **QUIET)
    torch.testing.assert_close(load_features(out).load()[0], twin.embeddings, atol=1e-5, rtol=0)
    code, stdout, err = _run_cli(argv + ["--shard-rows", "16"], capsys)
    assert code == 0 and "computed 0 now" in stdout, err
    code, stdout, err = _run_cli(["select", "--embeddings", str(out), "--k", "1", "--json"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert len(result["selected_layers"]) == 1 and result["selected_layers"][0] in (0, 1)
    # index j of the result is the store's j-th layer (model layers 0 and 2), named as such
    assert result["layer_names"] == ["hidden_states[1]", "hidden_states[3]"]
    code, _, err = _run_cli(argv + ["--shard-rows", "8"], capsys)
    assert code == 2 and "written with other settings" in err and len(err.splitlines()) == 1
    calls = []
    monkeypatch.setattr(cli_extract, "export_features", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(cli_extract, "extract", lambda *a, **k: calls.append(a))
    for bad, fragment in (
        (argv + ["--workers", "2"], "--workers apply with --ray only"),
        (argv + ["--ray", "--device", "cpu"], "--device applies without --ray"),
        (["extract", folder, str(data), "--output", str(data)], "is a file, not a folder"),
        (["extract", str(tmp_path / "nope"), str(data), "--output", str(out)], "no such file"),
    ):
        code, stdout, err = _run_cli(bad, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert lines[0].startswith("loes extract: error: ") and fragment in lines[0], lines[0]
    assert calls == []  # every mistake above is found before any work


def test_select_reads_an_unfinished_store_as_a_clear_error(tiny, rows, tmp_path, capsys):
    _, model, tok = tiny
    export_features(model, rows, tmp_path, tokenizer=tok, shard_rows=16, **QUIET)
    os.remove(tmp_path / "manifest.json")
    code, _, err = _run_cli(["select", "--embeddings", str(tmp_path), "--k", "1"], capsys)
    assert code == 2 and "did not finish" in err and len(err.strip().splitlines()) == 1
    shutil.rmtree(tmp_path)
    assert not Path(tmp_path).exists()
