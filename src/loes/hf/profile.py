"""Profile a Hugging Face model with every metric of :mod:`loes.metrics`: token metrics
streamed, views from augmented text."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from loes._deps import require
from loes._exceptions import LOESError
from loes._progress import ProgressSetting
from loes.augment import TextAugmenter, make_views
from loes.hf._models import load_model, load_processor
from loes.hf.data import find_input, load_dataset_any
from loes.hf.extract import extract_embeddings, iter_hidden_states
from loes.metrics import MetricProfile, TokenMetricAccumulator, profile

__all__ = ["profile_model"]

logger = logging.getLogger(__name__)


def profile_model(
    model: Any,
    dataset: Any,
    *,
    split: str = "train",
    text_key: str | None = None,
    max_samples: int | None = 256,
    n_views: int = 0,
    augment: Callable[[str], str] | None = None,
    metrics: Sequence[str] | None = None,
    alpha: float = 1.0,
    batch_size: int = 32,
    max_length: int = 256,
    device: Any = None,
    dtype: Any = None,
    gguf_file: str | None = None,
    tokenizer: Any = None,
    random_state: int = 0,
    show_progress: ProgressSetting = "auto",
) -> MetricProfile:
    """Every metric for every layer of a text model on a data set.

    Token states are streamed batch by batch (:func:`loes.hf.iter_hidden_states`)
    into a :class:`TokenMetricAccumulator`, so memory stays at one batch of
    token states plus the (n_samples, n_layers, dim) masked-mean pooled states,
    which feed the pooled metrics. With ``n_views >= 2`` each view is the
    pooled states of the same texts passed through ``augment`` (default: the
    study's perturbations, :class:`loes.augment.TextAugmenter`).

    Parameters
    ----------
    model : str, path or transformers model
        A local folder or hub id (loaded once), or a loaded model.
    dataset : str or datasets.Dataset
        Anything :func:`loes.extract_embeddings` accepts (e.g. ``"loes:drugreview"``).
    max_samples : int or None
        A seeded random subset of this many rows (None: all rows).
    n_views : int
        Augmented views for InfoNCE, LiDAR and DiME (0: none; otherwise >= 2).
    augment : callable, optional
        ``text -> text``; it should draw fresh randomness on each call.

    Returns
    -------
    MetricProfile
        With ``layer_names`` from the model and the CKA matrix of the pooled states.
    """
    require("transformers", extra="hf")
    datasets = require("datasets", extra="hf")
    if n_views == 1 or n_views < 0:
        raise LOESError(f"n_views must be 0 (no view metrics) or at least 2; got {n_views}")
    if isinstance(model, (str, os.PathLike)):
        source = os.fspath(model)
        if tokenizer is None:
            tokenizer = load_processor(source, "text", gguf_file=gguf_file)
        model = load_model(source, device=device, dtype=dtype, gguf_file=gguf_file)
    ds, name = load_dataset_any(dataset, split=split)
    kind, columns = find_input(ds, text_key, None)
    if kind != "text":
        raise LOESError(
            f"profile_model needs a single text column; the dataset's input is {kind} {columns}"
        )
    texts = list(ds[columns[0]])
    rng = np.random.default_rng(random_state)
    if max_samples is not None and max_samples < len(texts):
        rows = np.sort(rng.choice(len(texts), size=max_samples, replace=False))
        texts = [texts[i] for i in rows]
    common = dict(
        text_key="text",
        max_samples=None,
        batch_size=batch_size,
        max_length=max_length,
        tokenizer=tokenizer,
        random_state=random_state,
        show_progress=show_progress,
    )
    acc = TokenMetricAccumulator(alpha=alpha)
    layer_names = None
    for item in iter_hidden_states(model, datasets.Dataset.from_dict({"text": texts}), **common):
        layer_names = list(item.layer_names)
        acc.update(list(item.hidden_states), item.mask)
    views = None
    if n_views:
        augment = augment or TextAugmenter(random_state=rng)
        views = []
        for view_texts in make_views(texts, augment, n_views):
            emb = extract_embeddings(
                model,
                datasets.Dataset.from_dict({"text": view_texts}),
                task="label_free",
                pooling="masked_mean",
                **common,
            )
            order = np.argsort(emb.indices) if emb.indices is not None else slice(None)
            views.append(torch.as_tensor(emb.embeddings)[order])
    logger.info(
        "profiled %s on %s: %d texts, %d views",
        getattr(model, "name_or_path", "model"),
        name,
        len(texts),
        n_views,
    )
    out = profile(
        acc.pooled(),
        tokens=acc,
        views=views,
        metrics=metrics,
        alpha=alpha,
        random_state=random_state,
        layer_names=layer_names,
        show_progress=show_progress,
    )
    out.config.update(
        {"dataset": name, "n_samples": len(texts), "n_views": n_views, "pooling": "masked_mean"}
    )
    return out
