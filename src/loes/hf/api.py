"""The published entry points: ``select_layers_from_hf`` and ``select_layers_from_hf_id``."""

from __future__ import annotations

import inspect
import logging
import os
import time
from typing import Any, Callable, Dict, Optional, Union

import torch

from loes._exceptions import LOESError
from loes._progress import ProgressSetting
from loes.core import select_layers_from_custom_embeddings
from loes.hf.extract import Embeddings, extract_embeddings
from loes.hf.sampling import DEFAULT_MAX_SAMPLES
from loes.result import LOESResult

__all__ = ["select_from_embeddings", "select_layers_from_hf", "select_layers_from_hf_id"]

logger = logging.getLogger(__name__)

_RESERVED = ("layer_names", "pooling", "dataset", "model_name", "embeddings", "targets")


def _extraction_args(args: Dict[str, Any]) -> Dict[str, Any]:
    """The arguments of an entry point that :func:`extract_embeddings` takes."""
    args = dict(args, max_samples=args.get("max_calibration_samples"))
    wanted = set(inspect.signature(extract_embeddings).parameters) - {"model_or_id"}
    return {k: v for k, v in args.items() if k in wanted}


def select_from_embeddings(emb: Embeddings, *, k: Optional[int], task: str, random_state: Any,
                           show_progress: ProgressSetting, verbose: bool, logger: Optional[logging.Logger],
                           **select_kwargs: Any) -> LOESResult:
    """Run the core selector on extracted features, carrying their provenance."""
    clash = [name for name in _RESERVED if name in select_kwargs]
    if clash:
        raise LOESError(f"{clash} are set from the extracted model and data; do not pass them")
    result = select_layers_from_custom_embeddings(
        emb.embeddings, emb.targets if task != "label_free" else None, k,
        task=task, random_state=random_state if isinstance(random_state, int) or random_state is None else 0,
        show_progress=show_progress, verbose=verbose, logger=logger,
        layer_names=emb.layer_names, pooling=emb.pooling, dataset=emb.dataset,
        model_name=emb.model_name, **select_kwargs,
    )
    result.config["extraction"] = {
        k: v for k, v in emb.info.items() if k not in ("timings",)
    }
    result.config["extraction"]["from_cache"] = emb.from_cache
    result.config["extraction"]["n_rows_sampled"] = emb.n_samples
    if emb.indices is not None:
        result.config["extraction"]["indices"] = [int(i) for i in emb.indices]
    for name, seconds in (emb.info.get("timings") or {}).items():
        result.timings[name] = seconds
    return result


def select_layers_from_hf(
    model: torch.nn.Module,
    dataset: Any = None,
    dataloader: Any = None,
    *,
    task: str = "classification",
    k: Optional[int] = None,
    max_calibration_samples: Optional[int] = DEFAULT_MAX_SAMPLES,
    batch_size: int = 32,
    pooling: str = "auto",
    device: Any = None,
    split: str = "train",
    dataset_config_name: Optional[str] = None,
    text_key: Any = None,
    target_key: Optional[str] = None,
    processor: Any = None,
    tokenizer: Any = None,
    collate_fn: Optional[Callable] = None,
    max_length: int = 512,
    num_workers: int = 0,
    dtype: Any = None,
    include_embeddings: bool = False,
    cache_dir: Union[None, bool, str, os.PathLike] = None,
    cache_key: Optional[str] = None,
    random_state: Any = 0,
    show_progress: ProgressSetting = "auto",
    verbose: bool = False,
    logger: Optional[logging.Logger] = None,
    **select_kwargs: Any,
) -> LOESResult:
    """Select ``k`` layers of a loaded Hugging Face model on your data.

    Extracts pooled features with :func:`loes.extract_embeddings` (see there for
    ``dataset``/``dataloader``, sampling, pooling, caching) and runs
    :func:`loes.select_layers_from_custom_embeddings` on them. Every keyword of
    that function (``preset``, ``reg``, ``alpha``, ``gamma``/``beta``, ``eta``,
    ``ignore_index``, ...) passes through.

    Parameters
    ----------
    model : torch.nn.Module
        A Hugging Face model (any head: the base model/encoder/tower is run).
    dataset, dataloader
        Calibration data: a hub id, path, ``Dataset``/``DatasetDict``, or a
        dataloader yielding ``(inputs, targets)`` or dicts with a target key.
    task : {"classification", "regression", "label_free"}
    k : int
        Number of layers to select.
    max_calibration_samples : int or None
        Cap on calibration samples (default 1024), drawn with ``random_state``
        and stratified by class.

    Returns
    -------
    LOESResult
        With ``layer_names`` saying which hidden state each index is, ``pooling``,
        ``dataset`` and ``model_name`` filled in, and the extraction settings in
        ``config["extraction"]``.
    """
    args = dict(locals())
    emb = extract_embeddings(model, **_extraction_args(args))
    return select_from_embeddings(emb, k=k, task=task, random_state=random_state,
                                  show_progress=show_progress, verbose=verbose, logger=logger,
                                  **select_kwargs)


def select_layers_from_hf_id(
    model_id_or_path: Union[str, os.PathLike],
    dataset: Any = None,
    *,
    dataloader: Any = None,
    task: str = "classification",
    k: Optional[int] = None,
    split: str = "train",
    dataset_config_name: Optional[str] = None,
    text_key: Any = None,
    target_key: Optional[str] = None,
    max_calibration_samples: Optional[int] = DEFAULT_MAX_SAMPLES,
    batch_size: int = 32,
    pooling: str = "auto",
    device: Any = None,
    dtype: Any = None,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
    gguf_file: Optional[str] = None,
    model_loader: Optional[Callable[[str], torch.nn.Module]] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    processor: Any = None,
    tokenizer: Any = None,
    collate_fn: Optional[Callable] = None,
    max_length: int = 512,
    num_workers: int = 0,
    include_embeddings: bool = False,
    cache_dir: Union[None, bool, str, os.PathLike] = None,
    cache_key: Optional[str] = None,
    random_state: Any = 0,
    show_progress: ProgressSetting = "auto",
    verbose: bool = False,
    logger: Optional[logging.Logger] = None,
    **select_kwargs: Any,
) -> LOESResult:
    """Load a model by hub id or local folder and select ``k`` of its layers.

    The model is loaded with ``AutoModel.from_pretrained(model_id_or_path,
    revision=revision, trust_remote_code=trust_remote_code, gguf_file=gguf_file)``
    (``trust_remote_code`` is off by default; ``model_loader`` replaces the
    loader). Its tokenizer / image processor / feature extractor is loaded from
    the same place when the data needs one. Everything else is as in
    :func:`select_layers_from_hf`.

    Examples
    --------
    >>> from loes import select_layers_from_hf_id              # doctest: +SKIP
    >>> from loes.datasets import load_drugreview, minilm_path
    >>> result = select_layers_from_hf_id(minilm_path(), load_drugreview(), k=2,
    ...                                   max_calibration_samples=256)
    >>> print(result.summary())
    """
    args = dict(locals())
    source = os.fspath(model_id_or_path)
    if model_loader is not None:
        model: Any = model_loader(source)
        if processor is None and tokenizer is None:
            try:
                model.config._name_or_path = model.config._name_or_path or source
            except AttributeError:
                pass
    else:
        model = source
    t0 = time.perf_counter()
    emb = extract_embeddings(model, **_extraction_args(args))
    emb.model_name = source
    emb.info.setdefault("timings", {})["load_and_extract"] = time.perf_counter() - t0
    return select_from_embeddings(emb, k=k, task=task, random_state=random_state,
                                  show_progress=show_progress, verbose=verbose, logger=logger,
                                  **select_kwargs)
