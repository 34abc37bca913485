"""Export the pooled features of every row of a dataset to a feature store (:mod:`loes.store`).

:func:`export_features` is :func:`~loes.hf.extract_embeddings` over a whole
dataset (map-style or a stream), shard by shard: the model is loaded once, each
shard's rows go through the same extraction (tokenizing, length sorting, layer
capture with early stop, pooling), and each shard is written as soon as it is
done. A rerun skips the finished shards; an interrupted run leaves only complete
shards. :class:`ShardJob` is the per-shard step, shared with the workers of
:func:`loes.distributed.extract`; :func:`load_embeddings` reads a (small) store
back as an :class:`~loes.hf.Embeddings` for the selection entry points.

What the store's *plan* holds, so changed settings never reuse old shards: the
model's content (weights and buffers, config, class with the transformers and
loes versions, the tokenizer's or processor's files), the resolved pooling,
``max_length``, the layers, ``include_embeddings``, the input and target
columns, the device type and ``dtype``; plus, per shard, a fingerprint of its
rows (a shard whose rows changed is computed again).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loes._deps import require
from loes._exceptions import LOESError
from loes._progress import ProgressSetting, progress, quiet_third_party, warnings_at_caller
from loes.hf import _models as M
from loes.hf import extract as E
from loes.hf import fingerprint as F
from loes.hf.config import ExtractionConfig, check_keywords
from loes.hf.data import as_row_stream, is_dataloader, load_dataset_any
from loes.layers import resolve_layers
from loes.store import DTYPES, MANIFEST, FeatureStore, FeatureWriter, load_features

__all__ = ["Export", "ShardJob", "export_features", "load_embeddings", "prepare_export"]

logger = logging.getLogger(__name__)

#: Rows per shard when not given (about 15 MB of float32 features for 6 x 384).
DEFAULT_SHARD_ROWS = 1024


def rows_fingerprint(rows: Any) -> str:
    """Content hash of the values of every column of a ``datasets.Dataset`` (a shard's rows).

    Hashes the values, not the Arrow buffers, so the same rows give the same hash
    whether they come from a file, a ``select`` or a stream.
    """
    h = hashlib.sha256()
    table = rows.with_format("arrow")[:]
    for name in sorted(table.column_names):
        h.update(f"{name}\x00".encode())
        for value in table.column(name).to_pylist():
            h.update(f"{value!r}\x00".encode())
    return h.hexdigest()[:16]


@dataclass
class ShardJob:
    """The per-shard step: extract a shard's rows and write them (picklable, for workers).

    Attributes
    ----------
    writer : FeatureWriter
    kwargs : dict
        Keywords of :func:`~loes.hf.extract_embeddings` (every row, no cache, no bar).
    """

    writer: FeatureWriter
    kwargs: dict[str, Any]

    def run(self, model: torch.nn.Module, rows: Any, shard: int) -> bool:
        """Compute and write shard ``shard`` from ``rows`` (a ``datasets.Dataset`` of its rows)
        unless it is already written from the same rows; returns whether it was computed."""
        data = rows_fingerprint(rows)
        if self.writer.done(shard, data=data):
            return False
        try:
            emb = E.extract_embeddings(model, rows, **self.kwargs)
        except LOESError as e:
            start = shard * self.writer.shard_rows
            raise LOESError(
                f"shard {shard} (dataset rows {start}..{start + len(rows) - 1}; row numbers below "
                f"count within the shard): {e}"
            ) from None
        self.writer.write(shard, emb.embeddings, targets=emb.targets, data=data)
        return True


@dataclass
class Export:
    """A checked export: the model, the shards' rows and the job (see :func:`prepare_export`).

    ``shards()`` yields ``(shard, rows)`` with ``rows`` a ``datasets.Dataset``;
    ``n_rows`` is None for a stream (known once it is read to the end);
    ``with borrow():`` puts a caller's model on the run's device and dtype and
    gives it back as it came.
    """

    model: torch.nn.Module
    source: str | None
    job: ShardJob
    dataset: Any
    n_rows: int | None
    shards: Callable[[], Iterator[tuple[int, Any]]]
    borrow: Callable[[], Any]
    info: dict[str, Any] = field(default_factory=dict)


def _check_folder(path: Any) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LOESError(f"feature store path {path} is a file; give a folder")
    if path.is_dir():
        other = [
            p.name
            for p in path.iterdir()
            if not (p.name == MANIFEST or p.name.startswith(("shard-", MANIFEST)))
        ]
        if other:
            raise LOESError(
                f"{path} holds other files ({', '.join(sorted(other)[:3])}, ...), not a feature "
                "store: choose a new or empty folder"
            )
    return path


def _stream_chunks(stream: Any, shard_rows: int) -> Iterator[list[dict[str, Any]]]:
    """The rows of a stream in lists of ``shard_rows`` dicts (``(text, label)`` pairs as dicts)."""
    chunk: list[dict[str, Any]] = []
    for i, row in enumerate(stream):
        if isinstance(row, (tuple, list)) and len(row) == 2 and isinstance(row[0], str):
            row = {"text": row[0], "label": row[1]}
        elif not isinstance(row, dict):
            raise LOESError(
                f"stream row {i} is a {type(row).__name__}: yield dicts of columns or "
                "(text, label) pairs"
            )
        chunk.append(row)
        if len(chunk) == shard_rows:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _open_data(
    dataset: Any, *, split: str, config_name: str | None, shard_rows: int
) -> tuple[Any, int | None, Callable[[], Iterator[tuple[int, Any]]], Any]:
    """(map-style dataset or None, rows or None, shard iterator, first rows); reads a
    stream's first shard now, so a bad stream fails before the model is loaded."""
    datasets = require("datasets", extra="hf")
    obj, stream = as_row_stream(dataset)
    if not stream:
        if is_dataloader(obj):
            raise LOESError(
                "export_features reads rows, not batches: pass the dataset itself (a Dataset, "
                "hub id, file, DataFrame, IterableDataset or an iterable of row dicts)"
            )
        ds, _ = load_dataset_any(obj, split=split, config_name=config_name)
        if len(ds) == 0:
            raise LOESError("the dataset has no rows")

        def shards() -> Iterator[tuple[int, Any]]:
            for s, start in enumerate(range(0, len(ds), shard_rows)):
                yield s, ds.select(range(start, min(start + shard_rows, len(ds))))

        return ds, len(ds), shards, ds.select([0])
    features = getattr(obj, "features", None)

    def table(rows: list[dict[str, Any]]) -> Any:
        return datasets.Dataset.from_list(rows, features=features)

    chunks = _stream_chunks(obj, shard_rows)
    first = next(chunks, None)
    if first is None:
        raise LOESError("the stream yielded no rows")
    head = table(first)

    def stream_shards() -> Iterator[tuple[int, Any]]:
        yield 0, head
        for s, rows in enumerate(chunks, start=1):
            yield s, table(rows)

    return None, None, stream_shards, head.select([0])


def _processor(source: str | None, modality: str, processor: Any, **load: Any) -> Any:
    if processor is not None:
        return M.pick_processor(processor, modality)
    if source is None or modality not in ("text", "image", "audio"):
        return None
    try:
        return M.load_processor(source, modality, **load)
    except LOESError:
        return None  # e.g. tokenized input and a folder without tokenizer files


def prepare_export(
    model_or_id: Any,
    dataset: Any,
    path: Any,
    *,
    cfg: ExtractionConfig,
    shard_rows: int,
    storage_dtype: str,
    overwrite: bool,
    text_key: Any = None,
    target_key: str | None = None,
    split: str = "train",
    dataset_config_name: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    processor: Any = None,
    gguf_file: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    verbose: bool = False,
    run_device: str | None = None,
) -> Export:
    """Check everything, load the data and the model once, probe one row, open the writer.

    Order: arguments -> the model's config -> the data (a stream's first shard) ->
    the weights -> one row through the extraction (layer names, widths, pooling)
    -> the plan and the store folder. ``run_device`` names the device type the
    shards will run on when it is not where the model is (distributed workers).
    """
    if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
        raise LOESError(f"shard_rows must be a positive int; got {shard_rows!r}")
    if storage_dtype not in DTYPES:
        raise LOESError(f"storage_dtype must be one of {sorted(DTYPES)}; got {storage_dtype!r}")
    folder = _check_folder(path)
    if isinstance(model_or_id, (str, os.PathLike)):
        source: str | None = os.fspath(model_or_id)
        M.check_source(source, revision=revision)
        config = M.load_config(
            source, revision=revision, trust_remote_code=trust_remote_code, gguf_file=gguf_file
        )
    elif isinstance(model_or_id, torch.nn.Module):
        config = getattr(model_or_id, "config", None)
        source = getattr(config, "_name_or_path", None) or None
        if cfg.device_map is not None or cfg.quantization_config is not None:
            raise LOESError(
                "device_map=... and quantization_config=... apply when loes loads the model: "
                "pass a model id or folder"
            )
    else:
        raise LOESError(
            "model must be a Hugging Face model (torch.nn.Module), a hub id or a local folder; "
            f"got {type(model_or_id).__name__}"
        )
    n_blocks = M.n_hidden_layers(config)
    if cfg.layers is not None and n_blocks is not None:
        resolve_layers(cfg.layers, n_blocks + int(cfg.include_embeddings))
    cfg.resolved_max_length(M.position_limit(config))
    with quiet_third_party(verbose):  # datasets' "Generating train split" bars
        ds, n_rows, shards, first = _open_data(
            dataset, split=split, config_name=dataset_config_name, shard_rows=shard_rows
        )
    load = dict(revision=revision, trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    borrow: Callable[[], Any] = contextlib.nullcontext
    if not isinstance(model_or_id, torch.nn.Module):
        placement = {
            k: v
            for k, v in (
                ("device_map", cfg.device_map),
                ("max_memory", cfg.max_memory),
                ("offload_folder", cfg.offload_folder),
                ("quantization_config", cfg.quantization_config),
            )
            if v is not None
        }
        with quiet_third_party(verbose, gguf=gguf_file is not None):
            model = M.load_model(
                source,
                device=cfg.device,
                dtype=cfg.dtype,
                **load,
                **{**placement, **(model_kwargs or {})},
            )
    else:
        model = model_or_id
        if cfg.device is not None or cfg.dtype is not None:  # move once, give back at the end
            borrow = lambda: E._running(  # noqa: E731
                E._Plan(
                    model=model,
                    name="",
                    config=config,
                    data=None,
                    settings=ExtractionConfig(device=cfg.device, dtype=cfg.dtype),
                    max_length=0,
                    source=source,
                    borrowed=True,
                    get_processor=lambda modality: None,
                )
            )
    kwargs: dict[str, Any] = dict(
        text_key=text_key,
        target_key=target_key,
        task="label_free",
        max_samples=None,
        batch_size=cfg.batch_size,
        pooling=cfg.pooling,
        include_embeddings=cfg.include_embeddings,
        layers=cfg.layers,
        sort_by_length=cfg.sort_by_length,
        max_length=cfg.max_length,
        cache_dir=False,
        show_progress=False,
        verbose=verbose,
    )
    with borrow():
        probe = E.extract_embeddings(model, first, processor=processor, **kwargs)
    info = probe.info
    proc = _processor(source, info.get("modality", "unknown"), processor, **load)
    kwargs.update(pooling=probe.pooling, processor=proc)
    offset = 0 if cfg.include_embeddings else 1
    stored = [int(h) - offset for h in info["hidden_state_indices"]]
    prefix = probe.layer_names[0].split("hidden_states[")[0]
    n_total = (n_blocks + int(cfg.include_embeddings)) if n_blocks is not None else max(stored) + 1
    names = [f"{prefix}hidden_states[{i + offset}]" for i in range(n_total)]
    widths = [int(probe.layer(j).shape[1]) for j in range(probe.n_layers)]
    device_type = run_device or torch.device(info["device"]).type
    plan = {
        "model": {
            "code": F.code_version(model),
            "config": F.config_fingerprint(getattr(model, "config", config)),
            "weights": F.weights_fingerprint(model),
            "processor": F.processor_fingerprint(proc),
        },
        "pooling": probe.pooling,
        "max_length": info["max_length"],
        "include_embeddings": bool(cfg.include_embeddings),
        "input": [info.get("input_kind"), info.get("input_columns"), info.get("target_key")],
        "device": device_type,
        "dtype": str(cfg.dtype) if cfg.dtype is not None else "auto",
    }
    writer = FeatureWriter(
        folder,
        layers=stored,
        widths=widths,
        shard_rows=shard_rows,
        plan=plan,
        layer_names=names,
        dtype=storage_dtype,
        overwrite=overwrite,
    )
    name = source if source is not None else M.model_name(model)
    return Export(
        model=model,
        source=source,
        job=ShardJob(writer, kwargs),
        dataset=ds,
        n_rows=n_rows,
        shards=shards,
        borrow=borrow,
        info={
            "model": name,
            "dataset": _dataset_name(dataset, ds),
            "pooling": probe.pooling,
            "pooling_reason": info.get("pooling_reason"),
            "max_length": info["max_length"],
            "modality": info.get("modality"),
            "input_kind": info.get("input_kind"),
            "target_key": info.get("target_key"),
        },
    )


def _dataset_name(dataset: Any, ds: Any) -> str:
    if isinstance(dataset, (str, os.PathLike)):
        return os.fspath(dataset)
    return f"stream[{type(dataset).__name__}]" if ds is None else type(dataset).__name__


@warnings_at_caller
@check_keywords
def export_features(
    model_or_id: Any,
    dataset: Any,
    path: Any,
    *,
    layers: Any = None,
    pooling: str = "auto",
    text_key: Any = None,
    target_key: str | None = None,
    split: str = "train",
    dataset_config_name: str | None = None,
    max_length: int | None = None,
    batch_size: int = 32,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    device: Any = None,
    dtype: Any = None,
    storage_dtype: str = "float32",
    include_embeddings: bool = False,
    sort_by_length: bool = True,
    device_map: None | str | dict[str, Any] = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: None | str | os.PathLike = None,
    quantization_config: Any = None,
    overwrite: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
    processor: Any = None,
    tokenizer: Any = None,
    gguf_file: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    show_progress: ProgressSetting = "auto",
    verbose: bool = False,
) -> FeatureStore:
    """Pooled features of EVERY row of a dataset, written shard by shard to a feature store.

    The model is loaded once; each shard of ``shard_rows`` rows goes through
    :func:`~loes.hf.extract_embeddings` (same tokenizing, length sorting, layer
    capture with early stop and pooling, so the features equal it row for row)
    and is written atomically as soon as it is done. Rerun the same call after an
    interruption: finished shards are skipped. Other settings (model content,
    tokenizer, pooling, ``max_length``, layers, ``dtype``, device type, shard size,
    input columns) are refused on an existing store unless ``overwrite=True``; a
    shard whose rows changed is computed again.

    Parameters
    ----------
    model_or_id : torch.nn.Module or str
        A loaded model (borrowed: given back as it came), a hub id or a local folder.
    dataset : str, datasets.Dataset, DatasetDict, DataFrame, IterableDataset or iterable
        As :func:`~loes.hf.extract_embeddings` takes it (``split`` picks from a
        ``DatasetDict``); a stream (``IterableDataset``, an iterable of row dicts or
        ``(text, label)`` pairs) is read once, one shard at a time.
    path : str or path-like
        The store's folder (new, empty, or a store of the same settings to resume).
    layers : layer spec, optional
        Only these layers (``None``: all), captured with an early stop.
    shard_rows : int
        Rows per shard (default 1024).
    storage_dtype : {"float32", "float16", "bfloat16"}
        dtype of the stored features.
    overwrite : bool
        Replace a store written with other settings instead of refusing.
    pooling, text_key, target_key, max_length, batch_size, device, dtype, include_embeddings,
    sort_by_length, device_map, max_memory, offload_folder, quantization_config, revision,
    trust_remote_code, processor, tokenizer, gguf_file, model_kwargs, verbose
        As in :func:`~loes.hf.extract_embeddings`. Targets (the ``target_key`` column,
        or labels/label/... when present) are stored beside the features.
    show_progress : bool or {"auto", "on", "off"}
        One step per shard on stderr.

    Returns
    -------
    FeatureStore
        ``len(store)`` rows; ``store.batches(...)`` yields ``(x, y)`` with ``x`` of shape
        ``(n, k, D)``; ``store.info["computed"]`` the shards this call computed.

    Examples
    --------
    >>> import tempfile
    >>> from loes.datasets import load_drugreview, minilm_path
    >>> rows = load_drugreview("test").select(range(20))
    >>> store = export_features(minilm_path(), rows, tempfile.mkdtemp(), layers=[1, 4],
    ...                         shard_rows=16, show_progress=False)
    >>> len(store), store.layers, store.info["computed"]
    (20, [1, 4], [0, 1])
    >>> x, y = store.load()
    >>> tuple(x.shape), y.shape
    ((20, 2, 384), (20,))
    """
    if processor is not None and tokenizer is not None and processor is not tokenizer:
        raise LOESError("pass either processor=... or tokenizer=..., not both")
    cfg = ExtractionConfig(
        pooling=pooling,
        batch_size=batch_size,
        max_length=max_length,
        max_samples=None,
        device=device,
        dtype=dtype,
        include_embeddings=include_embeddings,
        layers=layers,
        sort_by_length=sort_by_length,
        device_map=device_map,
        max_memory=max_memory,
        offload_folder=offload_folder,
        quantization_config=quantization_config,
    )
    t0 = time.perf_counter()
    exp = prepare_export(
        model_or_id,
        dataset,
        path,
        cfg=cfg,
        shard_rows=shard_rows,
        storage_dtype=storage_dtype,
        overwrite=overwrite,
        text_key=text_key,
        target_key=target_key,
        split=split,
        dataset_config_name=dataset_config_name,
        revision=revision,
        trust_remote_code=trust_remote_code,
        processor=processor if processor is not None else tokenizer,
        gguf_file=gguf_file,
        model_kwargs=model_kwargs,
        verbose=verbose,
    )
    writer = exp.job.writer
    total = writer.n_shards(exp.n_rows) if exp.n_rows is not None else None
    computed: list[int] = []
    n_rows = 0
    with exp.borrow():
        for shard, rows in progress(
            exp.shards(), show_progress, desc="loes: export", total=total, unit="shard"
        ):
            if exp.job.run(exp.model, rows, shard):
                computed.append(shard)
            n_rows += len(rows)
    logger.info(
        "export to %s: %d rows, computed %d of %d shards in %.1fs",
        writer.path,
        n_rows,
        len(computed),
        writer.n_shards(n_rows),
        time.perf_counter() - t0,
    )
    return writer.finish(n_rows, info={**exp.info, "computed": computed})


def load_embeddings(path: Any, layers: Any = None) -> E.Embeddings:
    """A feature store in memory as :class:`~loes.hf.Embeddings` (for stores that fit in memory).

    Parameters
    ----------
    path : str or path-like
        A store folder written by :func:`export_features` or :func:`loes.distributed.extract`.
    layers : sequence of int, optional
        Model layer indices to load (default: every stored layer).

    Returns
    -------
    Embeddings
        ``embeddings`` of shape (n_rows, k, D) in the store's row order, ``targets``,
        ``layer_names`` of the loaded layers (``"hidden_states[8]"``), ``indices`` the
        row numbers. Index ``j`` of a selection on these features is ``layers[j]``
        of the store: map a pick back with ``store.layers``.
    """
    store = load_features(path)
    chosen = list(store.layers) if layers is None else [int(i) for i in layers]
    x, y = store.load(layers=chosen)
    names = [store.layer_names[i] if store.layer_names is not None else str(i) for i in chosen]
    return E.Embeddings(
        embeddings=x,
        targets=y,
        layer_names=names,
        pooling=str(store.info.get("pooling") or store.plan.get("pooling")),
        model_name=store.info.get("model"),
        dataset=store.info.get("dataset"),
        indices=np.arange(len(store)),
        info={**store.info, "store": str(store.path), "layers": chosen},
    )
