"""The published entry points: ``select_layers_from_hf`` and ``select_layers_from_hf_id``.

Both check every argument (extraction settings, ``k``, ``task``,
``random_state``, selector options and misspelt keywords) before a model or a
dataset is loaded, then extract features and run the core selector on them.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from loes._exceptions import LOESError
from loes._progress import ProgressSetting, quiet_third_party, warnings_at_caller
from loes._validation import normalize_task
from loes.core import DEFAULTS, select_layers_from_custom_embeddings
from loes.core._engine import make_options
from loes.hf.config import (
    ExtractionConfig,
    check_random_state_kind,
    split_random_state,
    unknown_keywords,
)
from loes.hf.extract import Embeddings, _extract
from loes.hf.sampling import DEFAULT_MAX_SAMPLES
from loes.result import LOESResult

__all__ = ["select_from_embeddings", "select_layers_from_hf", "select_layers_from_hf_id"]

logger = logging.getLogger(__name__)

#: Keywords of the core selector that the HF entry points fill in themselves.
_RESERVED = ("layer_names", "pooling", "dataset", "model_name", "embeddings", "targets")
#: Names a user may reach for, mapped to the entry points' own.
_ALIASES = {"max_samples": "max_calibration_samples", "model_id": "model_id_or_path"}


#: Keywords of the core selector that are not preset options.
_CORE_KEYWORDS = {"preset", "ignore_index", "estimate"}


def _check_selector_keywords(where: Callable, select_kwargs: dict[str, Any]) -> None:
    """Validate ``**select_kwargs`` (names and values) with the core's own option
    validator, before any model or data is touched."""
    own = [n for n in inspect.signature(where).parameters if n != "select_kwargs"]
    options = {n: v for n, v in select_kwargs.items() if n not in _CORE_KEYWORDS}
    if not isinstance(select_kwargs.get("estimate", True), bool):
        raise LOESError(f"estimate must be True or False; got {select_kwargs['estimate']!r}")
    preset = select_kwargs.get("preset", "robust")
    known = set(DEFAULTS.get(preset, {})) | _CORE_KEYWORDS | {"beta"}
    bad = [n for n in options if n not in known]
    if bad:
        unknown_keywords(where.__name__, bad, set(own) | known, _ALIASES)
    make_options(preset, **options)


def _check_request(
    where: Callable, *, k: Any, task: str, random_state: Any, select_kwargs: dict[str, Any]
) -> None:
    """The checks of an entry point that need no model and no data."""
    if k is None:
        raise LOESError("k (the number of layers to select) must be given, e.g. k=4 or k='auto'")
    if not (isinstance(k, str) and k == "auto") and (
        isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1
    ):
        raise LOESError(f"k must be an integer >= 1 or 'auto'; got {k!r}")
    normalize_task(task)
    check_random_state_kind(random_state)
    clash = [name for name in _RESERVED if name in select_kwargs]
    if clash:
        raise LOESError(f"{clash} are set from the extracted model and data; do not pass them")
    _check_selector_keywords(where, select_kwargs)


def select_from_embeddings(
    emb: Embeddings,
    *,
    k: int | None,
    task: str,
    random_state: Any,
    show_progress: ProgressSetting,
    verbose: bool,
    logger: logging.Logger | None,
    **select_kwargs: Any,
) -> LOESResult:
    """Run the core selector on extracted features, carrying their provenance."""
    result = select_layers_from_custom_embeddings(
        emb.embeddings,
        emb.targets if task != "label_free" else None,
        k,
        task=task,
        random_state=random_state,
        show_progress=show_progress,
        verbose=verbose,
        logger=logger,
        layer_names=emb.layer_names,
        pooling=emb.pooling,
        dataset=emb.dataset,
        model_name=emb.model_name,
        **select_kwargs,
    )
    result.config["extraction"] = {k: v for k, v in emb.info.items() if k not in ("timings",)}
    result.config["pooling_reason"] = emb.info.get(
        "pooling_reason", f"{emb.pooling}: from the cache"
    )
    result.config["extraction"]["from_cache"] = emb.from_cache
    result.config["extraction"]["n_rows_sampled"] = emb.n_samples
    if emb.indices is not None:
        result.config["extraction"]["indices"] = [int(i) for i in emb.indices]
    for name, seconds in (emb.info.get("timings") or {}).items():
        result.timings[name] = seconds
    return result


@warnings_at_caller
def select_layers_from_hf(
    model: torch.nn.Module,
    dataset: Any = None,
    dataloader: Any = None,
    *,
    task: str = "classification",
    k: int | None = None,
    max_calibration_samples: int | None = DEFAULT_MAX_SAMPLES,
    batch_size: int = 32,
    pooling: str = "auto",
    device: Any = None,
    split: str = "train",
    dataset_config_name: str | None = None,
    text_key: Any = None,
    target_key: str | None = None,
    processor: Any = None,
    tokenizer: Any = None,
    collate_fn: Callable | None = None,
    max_length: int | None = None,
    num_workers: int = 0,
    dtype: Any = None,
    include_embeddings: bool = False,
    cache_dir: None | bool | str | os.PathLike = None,
    cache_key: str | None = None,
    cache_max_bytes: int | None = None,
    config: ExtractionConfig | None = None,
    random_state: Any = 0,
    show_progress: ProgressSetting = "auto",
    verbose: bool = False,
    logger: logging.Logger | None = None,
    **select_kwargs: Any,
) -> LOESResult:
    """Select ``k`` layers of a loaded Hugging Face model on your data.

    Extracts pooled features with :func:`loes.extract_embeddings` (see there for
    ``dataset``/``dataloader``, sampling, pooling, caching) and runs
    :func:`loes.select_layers_from_custom_embeddings` on them. Every keyword of
    that function (``preset``, ``reg``, ``alpha``, ``gamma``/``beta``, ``eta``,
    ``ignore_index``, ...) passes through; any other keyword is a
    :class:`~loes.LOESError` with a "did you mean" hint. Every argument is
    checked before the data is loaded and the model is run; the model is given
    back as it came (device, dtype, training mode).

    Parameters
    ----------
    model : torch.nn.Module
        A Hugging Face model (any head: the base model/encoder/tower is run).
    dataset, dataloader
        Calibration data: a hub id, path, ``Dataset``/``DatasetDict``/DataFrame,
        or a dataloader yielding ``(inputs, targets)`` or dicts with a target key.
    task : {"classification", "regression", "label_free"}
    k : int
        Number of layers to select.
    max_calibration_samples : int or None
        Cap on calibration samples (default 1024), drawn with ``random_state``
        and stratified by class.
    config : ExtractionConfig, optional
        The extraction settings as one object instead of their keywords.
    random_state : None, int, numpy Generator/RandomState or torch.Generator
        Drives the calibration draw and the selector alike (an int seeds both).

    pooling : {"auto", "cls", "mean", "masked_mean", "max", "last_token"}
        ``"auto"`` honours a sentence-transformers model's declared pooling, else
        picks by model family (:func:`loes.hf.pooling.choose_pooling`).
    show_progress : bool or {"auto", "on", "off"}
        A bar on a terminal, a log line every few seconds elsewhere
        (:func:`loes._progress.progress`).
    verbose : bool
        Log loes's steps and let transformers / huggingface_hub show their own
        logging, bars and warnings (hidden by default).

    Returns
    -------
    LOESResult
        With ``layer_names`` saying which hidden state each index is, ``pooling``,
        ``dataset`` and ``model_name`` filled in, the pooling's reason in
        ``config["pooling_reason"]`` and the extraction settings in
        ``config["extraction"]``. Warnings point at the calling line.
    """
    _check_request(
        select_layers_from_hf,
        k=k,
        task=task,
        random_state=random_state,
        select_kwargs=select_kwargs,
    )
    cfg = ExtractionConfig.from_keywords(
        config,
        pooling=pooling,
        batch_size=batch_size,
        max_length=max_length,
        max_samples=max_calibration_samples,
        device=device,
        dtype=dtype,
        include_embeddings=include_embeddings,
        cache_dir=cache_dir,
        cache_key=cache_key,
        cache_max_bytes=cache_max_bytes,
        num_workers=num_workers,
    )
    sample_rs, select_rs = split_random_state(random_state)
    with quiet_third_party(verbose):
        emb = _extract(
            model,
            dataset,
            dataloader,
            cfg,
            task=task,
            k=k,
            split=split,
            dataset_config_name=dataset_config_name,
            text_key=text_key,
            target_key=target_key,
            random_state=sample_rs,
            revision=None,
            trust_remote_code=False,
            processor=processor,
            tokenizer=tokenizer,
            collate_fn=collate_fn,
            gguf_file=None,
            model_kwargs=None,
            show_progress=show_progress,
            verbose=verbose,
        )
    return select_from_embeddings(
        emb,
        k=k,
        task=task,
        random_state=select_rs,
        show_progress=show_progress,
        verbose=verbose,
        logger=logger,
        **select_kwargs,
    )


@warnings_at_caller
def select_layers_from_hf_id(
    model_id_or_path: str | os.PathLike,
    dataset: Any = None,
    *,
    dataloader: Any = None,
    task: str = "classification",
    k: int | None = None,
    split: str = "train",
    dataset_config_name: str | None = None,
    text_key: Any = None,
    target_key: str | None = None,
    max_calibration_samples: int | None = DEFAULT_MAX_SAMPLES,
    batch_size: int = 32,
    pooling: str = "auto",
    device: Any = None,
    dtype: Any = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
    model_loader: Callable[[str], torch.nn.Module] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    processor: Any = None,
    tokenizer: Any = None,
    collate_fn: Callable | None = None,
    max_length: int | None = None,
    num_workers: int = 0,
    include_embeddings: bool = False,
    cache_dir: None | bool | str | os.PathLike = None,
    cache_key: str | None = None,
    cache_max_bytes: int | None = None,
    config: ExtractionConfig | None = None,
    random_state: Any = 0,
    show_progress: ProgressSetting = "auto",
    verbose: bool = False,
    logger: logging.Logger | None = None,
    **select_kwargs: Any,
) -> LOESResult:
    """Load a model by hub id or local folder and select ``k`` of its layers.

    The model is loaded with ``AutoModel.from_pretrained(model_id_or_path,
    revision=revision, trust_remote_code=trust_remote_code, gguf_file=gguf_file)``
    (``trust_remote_code`` is off by default; ``model_loader`` replaces the
    loader). Its tokenizer / image processor / feature extractor is loaded from
    the same place when the data needs one. A missing folder, or a hub id that
    cannot be reached, is a :class:`~loes.LOESError` within seconds. Everything
    else is as in :func:`select_layers_from_hf`.

    Examples
    --------
    >>> from loes import select_layers_from_hf_id
    >>> from loes.datasets import load_drugreview, minilm_path
    >>> result = select_layers_from_hf_id(minilm_path(), load_drugreview(), k=2,
    ...                                   max_calibration_samples=256)  # doctest: +SKIP
    >>> print(result.summary())  # doctest: +SKIP
    """
    _check_request(
        select_layers_from_hf_id,
        k=k,
        task=task,
        random_state=random_state,
        select_kwargs=select_kwargs,
    )
    if not isinstance(model_id_or_path, (str, os.PathLike)):
        raise LOESError(
            f"model_id_or_path must be a hub id or a local folder; got "
            f"{type(model_id_or_path).__name__} (for a loaded model use select_layers_from_hf)"
        )
    cfg = ExtractionConfig.from_keywords(
        config,
        pooling=pooling,
        batch_size=batch_size,
        max_length=max_length,
        max_samples=max_calibration_samples,
        device=device,
        dtype=dtype,
        include_embeddings=include_embeddings,
        cache_dir=cache_dir,
        cache_key=cache_key,
        cache_max_bytes=cache_max_bytes,
        num_workers=num_workers,
    )
    sample_rs, select_rs = split_random_state(random_state)
    source = os.fspath(model_id_or_path)
    t0 = time.perf_counter()
    model: Any = source
    with quiet_third_party(verbose, gguf=gguf_file is not None):
        if model_loader is not None:
            model = model_loader(source)
            if processor is None and tokenizer is None:
                try:
                    model.config._name_or_path = model.config._name_or_path or source
                except AttributeError:
                    pass
        emb = _extract(
            model,
            dataset,
            dataloader,
            cfg,
            task=task,
            k=k,
            split=split,
            dataset_config_name=dataset_config_name,
            text_key=text_key,
            target_key=target_key,
            random_state=sample_rs,
            revision=revision,
            trust_remote_code=trust_remote_code,
            processor=processor,
            tokenizer=tokenizer,
            collate_fn=collate_fn,
            gguf_file=gguf_file,
            model_kwargs=model_kwargs,
            show_progress=show_progress,
            verbose=verbose,
        )
    emb.model_name = source
    emb.info.setdefault("timings", {})["load_and_extract"] = time.perf_counter() - t0
    return select_from_embeddings(
        emb,
        k=k,
        task=task,
        random_state=select_rs,
        show_progress=show_progress,
        verbose=verbose,
        logger=logger,
        **select_kwargs,
    )
