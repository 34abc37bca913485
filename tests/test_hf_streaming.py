"""Streams (datasets.IterableDataset, plain iterables of dicts or (text, label) pairs): one pass,
a seeded class-stratified reservoir, never the first rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loes import LOESError
from loes._splits import allocate
from loes.hf.sampling import stratified_reservoir


def _stream_labels(n=10_000, seed=5):
    return np.random.default_rng(seed).choice(3, n, p=[0.7, 0.2, 0.1])


def test_class_frequencies_match_the_stream_and_not_the_first_rows():
    y = _stream_labels()
    read = []

    def stream():
        for i, c in enumerate(y.tolist()):
            read.append(i)
            yield {"text": f"row {i}", "label": c}

    pos, rows, counts = stratified_reservoir(stream(), 500, lambda r: r["label"], random_state=0)
    assert read == list(range(len(y)))  # one pass
    got = np.bincount([r["label"] for r in rows], minlength=3)
    expected = 500 * np.bincount(y) / len(y)
    assert np.all(np.abs(got - expected) <= 2), (got, expected)
    assert np.all(np.abs(got - [350, 100, 50]) <= 2 + np.abs(expected - [350, 100, 50]))
    assert counts == {c: int((y == c).sum()) for c in range(3)}
    assert [r["text"] for r in rows] == [f"row {i}" for i in pos]
    assert (
        np.all(np.diff(pos) > 0) and pos.max() > 9_000 and not np.array_equal(pos, np.arange(500))
    )
    again, _, _ = stratified_reservoir(
        ({"label": c} for c in y.tolist()), 500, lambda r: r["label"], random_state=0
    )
    other, _, _ = stratified_reservoir(
        ({"label": c} for c in y.tolist()), 500, lambda r: r["label"], random_state=1
    )
    np.testing.assert_array_equal(pos, again)
    assert len(set(pos) & set(other)) < 100


def test_reservoir_equals_the_in_memory_twin():
    """Same keys, drawn in memory: per class, the quota's smallest keys."""
    y = _stream_labels(n=9_000, seed=3)
    pos, _, _ = stratified_reservoir(iter(y.tolist()), 300, lambda c: c, random_state=7)
    rng = np.random.default_rng(7)
    keys = np.concatenate([rng.random(4096) for _ in range(-(-len(y) // 4096))])[: len(y)]
    quota = allocate(300, np.bincount(y), capacity=np.bincount(y))
    twin = np.sort(
        np.concatenate(
            [np.flatnonzero(y == c)[np.argsort(keys[y == c])[:q]] for c, q in enumerate(quota)]
        )
    )
    np.testing.assert_array_equal(pos, twin)
    plain, _, counts = stratified_reservoir(iter(y.tolist()), 300, random_state=7)
    np.testing.assert_array_equal(plain, np.sort(np.argsort(keys)[:300]))
    assert counts == {None: len(y)}


transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from loes import extract_embeddings  # noqa: E402
from loes.datasets import load_drugreview, minilm_path  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=30522,
    )
    model = transformers.AutoModel.from_config(cfg).eval()
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    ds = load_drugreview("test").select(range(120))
    ds = datasets.Dataset.from_dict(
        {"review": [t[:200] for t in ds["text"]], "label": list(ds["label"])}
    )
    return model, tok, ds


@pytest.mark.parametrize("kind", ["iterable_dataset", "dict_generator", "pairs", "list_of_dicts"])
def test_streams_give_the_features_of_the_sampled_rows(kind, setup):
    model, tok, ds = setup
    rows = [{"text": r["review"], "label": r["label"]} for r in ds]
    stream = {
        "iterable_dataset": lambda: ds.to_iterable_dataset(),
        "dict_generator": lambda: (r for r in rows),
        "pairs": lambda: ((r["text"], r["label"]) for r in rows),
        "list_of_dicts": lambda: rows,
    }[kind]
    emb = extract_embeddings(
        model, stream(), tokenizer=tok, max_samples=40, random_state=3, show_progress=False
    )
    assert emb.n_samples == 40 and not np.array_equal(emb.indices, np.arange(40))
    np.testing.assert_array_equal(emb.targets, np.asarray(ds["label"])[emb.indices])
    twin = extract_embeddings(
        model, ds.select(emb.indices), tokenizer=tok, max_samples=None, show_progress=False
    )
    torch.testing.assert_close(emb.embeddings, twin.embeddings, atol=1e-5, rtol=1e-5)
    again = extract_embeddings(
        model, stream(), tokenizer=tok, max_samples=40, random_state=3, show_progress=False
    )
    np.testing.assert_array_equal(again.indices, emb.indices)


def test_bad_stream_rows(setup):
    model, tok, _ = setup
    with pytest.raises(LOESError, match="no target column"):
        extract_embeddings(model, iter([{"text": "a"}, {"text": "b"}]), tokenizer=tok)
    with pytest.raises(LOESError, match=r"stream row 1 is a int"):
        extract_embeddings(model, iter([{"text": "a", "label": 0}, 5]), tokenizer=tok)
    with pytest.raises(LOESError, match="no value for the target 'label'"):
        extract_embeddings(
            model, iter([{"text": "a", "label": 0}, {"text": "b", "label": None}]), tokenizer=tok
        )
