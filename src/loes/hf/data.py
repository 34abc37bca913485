"""Data side of extraction: datasets and dataloaders become padded model-input batches.

A :class:`CalibrationData` knows the calibration rows (a seeded, stratified
sample of a dataset, or the first rows of a dataloader), their targets, and
yields :class:`Batch` objects (model inputs, a pooling mask, row positions).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from loes._deps import require
from loes._exceptions import LOESError, LOESWarning
from loes.datasets import load_bbc_news, load_drugreview
from loes.hf._models import MODEL_INPUT_KEYS, check_source, looks_like_path, modality_of
from loes.hf.sampling import calibration_indices, stratified_reservoir

logger = logging.getLogger(__name__)

TARGET_KEYS = ("labels", "label", "targets", "target", "y")
TEXT_KEYS = (
    "text",
    "sentence",
    "query",
    "document",
    "content",
    "review",
    "question",
    "prompt",
    "input",
)
TEXT_PAIR_KEYS = (
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("question", "passage"),
    ("query", "document"),
    ("text_a", "text_b"),
)
IMAGE_KEYS = ("image", "img", "images", "picture", "photo")
AUDIO_KEYS = ("audio", "speech", "waveform")
#: Local data files the loader reads, by extension.
DATA_FILE_BUILDERS = {
    "csv": "csv",
    "tsv": "csv",
    "json": "json",
    "jsonl": "json",
    "parquet": "parquet",
}


@dataclass
class Batch:
    """One model-input batch.

    Attributes
    ----------
    inputs : dict of str to tensor
        What the model's forward receives (filtered again against its signature).
    mask : bool tensor of shape (batch, length), optional
        Real positions at input resolution (tokens, audio samples) for pooling.
    positions : ndarray of shape (batch,)
        Positions of these rows in the calibration order (0..n_samples-1).
    targets : array of shape (batch, ...), optional
    """

    inputs: dict[str, Any]
    mask: torch.Tensor | None
    positions: np.ndarray
    targets: np.ndarray | None = None


@dataclass
class CalibrationData:
    """Calibration rows and how to batch them."""

    batches: Callable[[], Iterator[Batch]]
    modality: str
    n_samples: int | None = None
    targets: np.ndarray | None = None
    indices: np.ndarray | None = None
    name: str | None = None
    fingerprint: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- datasets
def is_dataloader(obj: Any) -> bool:
    """A torch DataLoader or any iterable of batches that is not a datasets object."""
    if isinstance(obj, torch.utils.data.DataLoader):
        return True
    if (
        isinstance(obj, (str, bytes, os.PathLike, dict))
        or _is_hf_dataset(obj)
        or _is_dataset_dict(obj)
    ):
        return False
    if _is_dataframe(obj):
        return False
    return hasattr(obj, "__iter__") and not hasattr(obj, "column_names")


def _is_hf_dataset(obj: Any) -> bool:
    return (
        type(obj).__name__ == "Dataset" and hasattr(obj, "column_names") and hasattr(obj, "select")
    )


def _is_dataframe(obj: Any) -> bool:
    return type(obj).__name__ == "DataFrame" and type(obj).__module__.startswith("pandas")


def _is_dataset_dict(obj: Any) -> bool:
    return type(obj).__name__ in ("DatasetDict", "IterableDatasetDict") or (
        isinstance(obj, dict) and obj and all(_is_hf_dataset(v) for v in obj.values())
    )


def load_dataset_any(
    dataset: Any, *, split: str = "train", config_name: str | None = None
) -> tuple[Any, str]:
    """A ``datasets.Dataset`` and a name for it from an id, a path, a ``Dataset`` or a ``DatasetDict``.

    Strings: ``"loes:drugreview"`` / ``"loes:bbc_news"`` (packaged data), a folder
    written by ``save_to_disk``, a csv/tsv/json/jsonl/parquet file, or a hub id.
    A pandas DataFrame becomes a ``Dataset`` (``Dataset.from_pandas``).
    """
    name = None
    if _is_dataframe(dataset):
        datasets = require("datasets", extra="hf")
        dataset = datasets.Dataset.from_pandas(dataset, preserve_index=False)
        name = "DataFrame"
    if isinstance(dataset, (str, os.PathLike)):
        name = os.fspath(dataset)
        dataset = _load_by_name(name, split=split, config_name=config_name)
    if _is_dataset_dict(dataset):
        if split not in dataset:
            raise LOESError(
                f"split {split!r} not found; the dataset has splits {sorted(dataset)}: pass split=..."
            )
        name = f"{name or 'dataset'}[{split}]"
        dataset = dataset[split]
    if not _is_hf_dataset(dataset):
        raise LOESError(
            "dataset must be a Hugging Face dataset id, a local data file or folder, a "
            f"datasets.Dataset or DatasetDict, or a dataloader; got {type(dataset).__name__}"
        )
    if name is None:
        info = getattr(dataset, "info", None)
        name = (
            getattr(info, "dataset_name", None) or getattr(info, "builder_name", None) or "Dataset"
        )
        split_name = getattr(dataset, "split", None)
        if split_name is not None:
            name = f"{name}[{split_name}]"
    return dataset, str(name)


def _load_by_name(name: str, *, split: str, config_name: str | None):
    if name.startswith("loes:"):
        key = name[5:].replace("-", "_")
        if key == "drugreview":
            return load_drugreview(split if split in ("train", "test", "all") else "train")
        if key in ("bbc_news", "bbc"):
            return load_bbc_news()
        raise LOESError(
            f"unknown packaged dataset {name!r}: use 'loes:drugreview' or 'loes:bbc_news'"
        )
    datasets = require("datasets", extra="hf")
    ext = name.rsplit(".", 1)[-1].lower() if "." in os.path.basename(name) else ""
    if not os.path.exists(name) and (ext in DATA_FILE_BUILDERS or looks_like_path(name)):
        raise LOESError(
            f"dataset file not found: {name!r} does not exist (check the path; a hub "
            "dataset id has the form 'org/name')"
        )
    if os.path.isdir(name):
        if os.path.exists(os.path.join(name, "dataset_info.json")) or os.path.exists(
            os.path.join(name, "dataset_dict.json")
        ):
            return datasets.load_from_disk(name)
        return datasets.load_dataset(name, config_name, split=split)
    if os.path.isfile(name):
        builder = DATA_FILE_BUILDERS.get(ext)
        if builder is None:
            raise LOESError(
                f"cannot read {name!r}: use a .csv, .tsv, .json, .jsonl or .parquet file"
            )
        extra = {"delimiter": "\t"} if ext == "tsv" else {}
        return datasets.load_dataset(builder, data_files=name, split="train", **extra)
    check_source(name, what="dataset")
    return datasets.load_dataset(name, config_name, split=split)


def _columns_hint(columns: Sequence[str]) -> str:
    return f"the dataset has columns {list(columns)}"


def find_target_key(
    columns: Sequence[str], target_key: str | None, *, required: bool
) -> str | None:
    if target_key is not None:
        if target_key not in columns:
            raise LOESError(f"target_key={target_key!r} not found: {_columns_hint(columns)}")
        return target_key
    for key in TARGET_KEYS:
        if key in columns:
            return key
    if required:
        raise LOESError(
            f"no target column found among {list(TARGET_KEYS)}: {_columns_hint(columns)}; "
            "pass target_key=<column>, or task='label_free' to select without labels"
        )
    return None


def _feature_kind(dataset, column: str) -> str | None:
    feat = dataset.features.get(column) if hasattr(dataset, "features") else None
    kind = type(feat).__name__
    if kind == "Image":
        return "image"
    if kind in ("Audio", "Video"):
        return "audio" if kind == "Audio" else None
    return None


def find_input(dataset, text_key: Any, target: str | None) -> tuple[str, tuple[str, ...]]:
    """(kind, columns): kind is "tokenized", "text", "text_pair", "image" or "audio"."""
    columns = list(dataset.column_names)
    if text_key is not None:
        keys = (text_key,) if isinstance(text_key, str) else tuple(text_key)
        missing = [k for k in keys if k not in columns]
        if missing or not 1 <= len(keys) <= 2:
            raise LOESError(f"text_key={text_key!r} not found: {_columns_hint(columns)}")
        if len(keys) == 2:
            return "text_pair", keys
        kind = _feature_kind(dataset, keys[0])
        if kind is None and keys[0] in MODEL_INPUT_KEYS:
            return "tokenized", tuple(k for k in MODEL_INPUT_KEYS if k in columns)
        return kind or "text", keys
    tokenized = tuple(k for k in MODEL_INPUT_KEYS if k in columns)
    if tokenized:
        return "tokenized", tokenized
    for col in columns:
        kind = _feature_kind(dataset, col)
        if kind:
            return kind, (col,)
    for kind, names in (("image", IMAGE_KEYS), ("audio", AUDIO_KEYS)):
        for col in names:
            if col in columns:
                return kind, (col,)
    for pair in TEXT_PAIR_KEYS:
        if all(k in columns for k in pair):
            return "text_pair", pair
    for col in TEXT_KEYS:
        if col in columns:
            return "text", (col,)
    raise LOESError(
        f"no input column found (text: {list(TEXT_KEYS)}; pairs: {[list(p) for p in TEXT_PAIR_KEYS]}; "
        f"images: {list(IMAGE_KEYS)}; audio: {list(AUDIO_KEYS)}; or tokenized {list(MODEL_INPUT_KEYS)}): "
        f"{_columns_hint(columns)}; pass text_key=<column>"
    )


def column_values(dataset, column: str) -> list[Any]:
    return list(dataset[column])


def _as_target_array(values: Sequence[Any]) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype == object:
        try:
            arr = np.asarray([np.asarray(v, dtype=float) for v in values])
        except (TypeError, ValueError) as e:
            raise LOESError(f"targets could not be read as an array (ragged?): {e}") from e
    return arr


# ------------------------------------------------------------------ padding
def pad_rows(
    rows: Sequence[dict[str, Any]], *, pad_token_id: int = 0, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Collate rows of model inputs, padding ragged sequences along the last axis.

    ``input_ids`` pad with ``pad_token_id``, masks and ids with 0; an
    ``attention_mask`` is created when sequences were ragged and none was given.
    """
    out: dict[str, torch.Tensor] = {}
    lengths = None
    for key in rows[0]:
        values = [torch.as_tensor(r[key]) for r in rows]
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) == 1:
            out[key] = torch.stack(values)
            continue
        if len({v.shape[:-1] for v in values}) != 1:
            raise LOESError(
                f"cannot pad {key!r}: shapes {sorted(shapes)} differ beyond the last axis"
            )
        width = max(v.shape[-1] for v in values)
        pad_value = pad_token_id if key == "input_ids" else 0
        padded = values[0].new_full((len(values), *values[0].shape[:-1], width), pad_value)
        for i, v in enumerate(values):
            n = v.shape[-1]
            if padding_side == "left":
                padded[i, ..., width - n :] = v
            else:
                padded[i, ..., :n] = v
        out[key] = padded
        if key in ("input_ids", "input_values"):
            lengths = [v.shape[-1] for v in values]
    if lengths is not None and "attention_mask" not in out:
        width = max(lengths)
        pos = torch.arange(width)[None, :]
        n = torch.tensor(lengths)[:, None]
        out["attention_mask"] = (pos >= width - n) if padding_side == "left" else (pos < n)
        out["attention_mask"] = out["attention_mask"].long()
    return out


def tokenizer_padding(tokenizer: Any, config: Any) -> tuple[int, str]:
    """(pad id, side). Decoders without a pad token fall back to eos, then unk, bos, 0."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        for attr in ("eos_token_id", "unk_token_id", "bos_token_id"):
            pad = getattr(tokenizer, attr, None)
            if isinstance(pad, list):
                pad = pad[0] if pad else None
            if pad is not None:
                logger.info(
                    "tokenizer has no pad token; padding with %s (%d): padded positions are masked",
                    attr.replace("_id", ""),
                    pad,
                )
                break
    if pad is None and config is not None:
        pad = getattr(config, "pad_token_id", None)
    side = getattr(tokenizer, "padding_side", "right") or "right"
    return int(pad or 0), side


def tokenize(
    tokenizer: Any, texts: Sequence[str], pairs: Sequence[str] | None, max_length: int
) -> list[dict[str, Any]]:
    """Tokenize without padding (one dict per row)."""
    enc = tokenizer(
        list(texts),
        list(pairs) if pairs is not None else None,
        truncation=True,
        max_length=max_length,
        padding=False,
    )
    keys = [k for k in enc.keys() if k in MODEL_INPUT_KEYS]
    return [{k: enc[k][i] for k in keys} for i in range(len(texts))]


def _check_texts(values: Sequence[Any], column: str) -> list[str]:
    bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
    if bad:
        raise LOESError(
            f"column {column!r} must hold strings; row {bad[0]} holds {type(values[bad[0]]).__name__}: "
            "pass text_key=<a text column>"
        )
    return list(values)


def batches_from_rows(
    rows: list[dict[str, Any]],
    targets: np.ndarray | None,
    batch_size: int,
    *,
    pad_token_id: int,
    padding_side: str,
    sort_by_length: bool = True,
) -> Iterator[Batch]:
    """Length-sorted (longest first), padded batches of tokenized rows."""
    if sort_by_length and rows and "input_ids" in rows[0]:
        lengths = np.array([len(r["input_ids"]) for r in rows])
        order = np.argsort(-lengths, kind="stable")
    else:
        order = np.arange(len(rows))
    for start in range(0, len(order), batch_size):
        pos = order[start : start + batch_size]
        inputs = pad_rows(
            [rows[i] for i in pos], pad_token_id=pad_token_id, padding_side=padding_side
        )
        yield Batch(
            inputs=inputs,
            mask=inputs.get("attention_mask"),
            positions=pos,
            targets=None if targets is None else targets[pos],
        )


def _to_rgb(image: Any) -> Any:
    mode = getattr(image, "mode", None)
    if mode is not None and mode != "RGB":
        return image.convert("RGB")
    return image


def _audio_array(value: Any) -> tuple[np.ndarray, int | None]:
    if isinstance(value, dict) and "array" in value:
        return np.asarray(value["array"], dtype=np.float32), value.get("sampling_rate")
    if hasattr(value, "get_all_samples"):  # datasets >= 4 decodes audio lazily
        samples = value.get_all_samples()
        return samples.data.mean(0).numpy().astype(np.float32), int(samples.sample_rate)
    return np.asarray(value, dtype=np.float32), None


def audio_batch(
    processor: Any, values: Sequence[Any]
) -> tuple[dict[str, Any], torch.Tensor | None]:
    arrays, rates = zip(*(_audio_array(v) for v in values))
    expected = getattr(processor, "sampling_rate", None)
    rates = {r for r in rates if r is not None}
    if expected and rates and rates != {expected}:
        raise LOESError(
            f"audio sampled at {sorted(rates)} Hz but the feature extractor expects {expected} Hz: "
            f"resample first, e.g. dataset.cast_column('audio', datasets.Audio(sampling_rate={expected}))"
        )
    kwargs: dict[str, Any] = {"return_tensors": "pt", "return_attention_mask": True}
    if expected:
        kwargs["sampling_rate"] = expected
    if not hasattr(processor, "chunk_length"):  # Whisper pads to its 30 s window itself
        kwargs["padding"] = True
    enc = dict(processor(list(arrays), **kwargs))
    mask = enc.get("attention_mask")
    if mask is not None and not getattr(processor, "return_attention_mask", True):
        enc.pop("attention_mask")  # this model is meant to run without one (e.g. wav2vec2-base)
    return enc, mask


def content_fingerprint(
    dataset, columns: Sequence[str], indices: np.ndarray, extra: str = ""
) -> str:
    """Hash of the used columns of the sampled rows (content, not object identity)."""
    h = hashlib.sha256(extra.encode())
    h.update(np.asarray(indices, dtype=np.int64).tobytes())
    cols = [c for c in columns if c in dataset.column_names]
    table = dataset.select_columns(cols).with_format("arrow")[[int(i) for i in indices]]
    for col in cols:
        h.update(col.encode())
        for chunk in table.column(col).chunks:
            for buf in chunk.buffers():
                if buf is not None:
                    h.update(memoryview(buf))
    return h.hexdigest()[:16]


# --------------------------------------------------------------- builders
def from_dataset(
    dataset: Any,
    *,
    get_processor: Callable[[str], Any],
    config: Any,
    task: str,
    split: str = "train",
    config_name: str | None = None,
    text_key: Any = None,
    target_key: str | None = None,
    max_samples: int | None,
    batch_size: int,
    max_length: int = 512,
    random_state: Any = 0,
    collate_fn: Callable | None = None,
    num_workers: int = 0,
    sort_by_length: bool = True,
) -> CalibrationData:
    """Calibration data from a hub id, path, ``Dataset``, ``DatasetDict`` or DataFrame.

    ``config`` is the model's config (padding fallback; group-norm audio models
    get pad-free batches of equal-length clips).
    """
    ds, name = load_dataset_any(dataset, split=split, config_name=config_name)
    if len(ds) == 0:
        raise LOESError(f"dataset {name} has no rows")
    columns = list(ds.column_names)
    tkey = find_target_key(columns, target_key, required=task != "label_free")
    labels = None
    if tkey is not None:
        raw = column_values(ds, tkey)
        missing = [i for i, v in enumerate(raw) if v is None]
        if missing and task != "label_free":
            raise LOESError(
                f"target column {tkey!r} has {len(missing)} missing value(s) (None), first at rows "
                f"{missing[:5]}: drop them first, e.g. dataset.filter(lambda r: r[{tkey!r}] is not None)"
            )
        labels = _as_target_array(raw) if not missing else None
    all_classes = None
    feat = ds.features.get(tkey) if tkey is not None else None
    if type(feat).__name__ == "ClassLabel":
        all_classes = list(range(feat.num_classes))
    indices = calibration_indices(
        len(ds),
        max_samples,
        labels if task == "classification" else None,
        all_classes=all_classes,
        random_state=random_state,
    )
    targets = labels[indices] if labels is not None else None
    sub = ds.select(indices) if len(indices) < len(ds) else ds
    info: dict[str, Any] = {"target_key": tkey, "split": split, "n_rows": len(ds)}

    if collate_fn is not None:
        loader = torch.utils.data.DataLoader(
            sub,
            batch_size=batch_size,
            collate_fn=collate_fn,
            num_workers=num_workers,
            shuffle=False,
        )
        data = from_dataloader(
            loader,
            get_processor=get_processor,
            config=config,
            task=task,
            target_key=target_key,
            max_samples=None,
            text_key=text_key,
            max_length=max_length,
            random_state=random_state,
        )
        data.indices, data.name = indices, name
        fn_name = f"{getattr(collate_fn, '__module__', '')}.{getattr(collate_fn, '__qualname__', collate_fn)}"
        data.fingerprint = content_fingerprint(
            ds, columns, indices, extra=f"{name}|collate_fn={fn_name}"
        )
        return data

    kind, in_cols = find_input(ds, text_key, tkey)
    info.update(input_kind=kind, input_columns=list(in_cols))
    modality = {"tokenized": "text", "text": "text", "text_pair": "text"}.get(kind, kind)
    if kind == "tokenized":
        modality = modality_of({k: None for k in in_cols})
    pad_free = kind == "audio" and group_norm_audio(config)
    if pad_free:
        logger.info(
            "%s normalises over time (feat_extract_norm='group'): clips are batched only with "
            "clips of equal length, never padded",
            getattr(config, "model_type", "the model"),
        )
    fingerprint = content_fingerprint(
        ds, list(in_cols) + ([tkey] if tkey else []), indices, extra=f"{name}|{kind}|{max_length}"
    )
    logger.info(
        "calibration rows: %d of %d from %s (input %s %s, target %s)",
        len(indices),
        len(ds),
        name,
        kind,
        list(in_cols),
        tkey,
    )

    def make_batches() -> Iterator[Batch]:
        if kind in ("text", "text_pair", "tokenized"):
            if kind == "tokenized":
                cols = {c: column_values(sub, c) for c in in_cols}
                rows = [{c: cols[c][i] for c in in_cols} for i in range(len(sub))]
                tok = get_processor("text") if "input_ids" in in_cols else None
            else:
                tok = get_processor("text")
                texts = _check_texts(column_values(sub, in_cols[0]), in_cols[0])
                pairs = (
                    _check_texts(column_values(sub, in_cols[1]), in_cols[1])
                    if kind == "text_pair"
                    else None
                )
                rows = tokenize(tok, texts, pairs, max_length)
            pad_id, side = tokenizer_padding(tok, config) if tok is not None else (0, "right")
            yield from batches_from_rows(
                rows,
                targets,
                batch_size,
                pad_token_id=pad_id,
                padding_side=side,
                sort_by_length=sort_by_length,
            )
            return
        proc = get_processor(modality)
        if kind == "audio" and pad_free:
            yield from _equal_length_batches(proc, list(sub[in_cols[0]]), targets, batch_size)
            return
        for start in range(0, len(sub), batch_size):
            pos = np.arange(start, min(start + batch_size, len(sub)))
            values = list(sub[int(pos[0]) : int(pos[-1]) + 1][in_cols[0]])
            if kind == "image":
                inputs = dict(proc(images=[_to_rgb(v) for v in values], return_tensors="pt"))
                mask = None
            else:
                inputs, mask = audio_batch(proc, values)
            yield Batch(
                inputs=inputs,
                mask=mask,
                positions=pos,
                targets=None if targets is None else targets[pos],
            )

    return CalibrationData(
        batches=make_batches,
        modality=modality,
        n_samples=len(indices),
        targets=targets,
        indices=indices,
        name=name,
        fingerprint=fingerprint,
        info=info,
    )


def group_norm_audio(config: Any) -> bool:
    """Audio models whose feature encoder normalises over time (wav2vec2-base style): padding
    changes their outputs, and transformers advises running them without an attention mask."""
    return getattr(config, "feat_extract_norm", None) == "group"


def _equal_length_batches(
    proc: Any, values: list[Any], targets: np.ndarray | None, batch_size: int
) -> Iterator[Batch]:
    """Batches of clips of equal length only (no padding), at most ``batch_size`` each."""
    decoded = [_audio_array(v) for v in values]
    lengths = np.array([len(a) for a, _ in decoded])
    order = np.argsort(lengths, kind="stable")
    start = 0
    while start < len(order):
        stop = start + 1
        while (
            stop < len(order)
            and stop - start < batch_size
            and lengths[order[stop]] == lengths[order[start]]
        ):
            stop += 1
        pos = order[start:stop]
        inputs, _ = audio_batch(
            proc, [{"array": decoded[i][0], "sampling_rate": decoded[i][1]} for i in pos]
        )
        inputs.pop("attention_mask", None)
        yield Batch(
            inputs=inputs,
            mask=None,
            positions=pos,
            targets=None if targets is None else targets[pos],
        )
        start = stop


def split_batch(batch: Any, *, target_key: str | None, require_targets: bool) -> tuple[Any, Any]:
    """(inputs, targets) from a dict with a target key or an (inputs, targets) pair."""
    if isinstance(batch, dict) or hasattr(batch, "keys") and not torch.is_tensor(batch):
        keys = list(batch.keys())
        key = target_key if target_key in keys else None
        if key is None and target_key is None:
            key = next((k for k in TARGET_KEYS if k in keys), None)
        if key is None:
            if require_targets:
                raise LOESError(
                    f"dataloader batches are dicts with keys {keys} but none is a target "
                    f"({repr(target_key) if target_key else 'one of ' + str(list(TARGET_KEYS))}): "
                    "pass target_key=<key>, "
                    "yield (inputs, targets) tuples, or use task='label_free'"
                )
            return dict(batch), None
        return {k: v for k, v in batch.items() if k != key}, batch[key]
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1 and not require_targets:
            return batch[0], None
    if torch.is_tensor(batch) and not require_targets:
        return batch, None
    raise LOESError(
        "each dataloader batch must be an (inputs, targets) pair or a dict with a target key "
        f"({list(TARGET_KEYS)}); got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def _batch_size_of(inputs: dict[str, Any]) -> int:
    for v in inputs.values():
        if torch.is_tensor(v) or isinstance(v, np.ndarray):
            return int(v.shape[0])
        if isinstance(v, (list, tuple)):
            return len(v)
    raise LOESError("could not tell the batch size: the batch holds no tensors or lists")


def _subset_loader(
    loader: Any, max_samples: int | None, random_state: Any, task: str
) -> tuple[Any, np.ndarray | None]:
    """A sequential DataLoader over a map-style dataset longer than the cap is
    re-drawn as a seeded (stratified where labels are cheap to read) subset."""
    if not isinstance(loader, torch.utils.data.DataLoader) or max_samples is None:
        return loader, None
    ds = loader.dataset
    if isinstance(ds, torch.utils.data.IterableDataset) or not hasattr(ds, "__len__"):
        return loader, None
    if not isinstance(loader.sampler, torch.utils.data.SequentialSampler) or len(ds) <= max_samples:
        return loader, None
    labels = None
    if task == "classification":
        if (
            isinstance(ds, torch.utils.data.TensorDataset)
            and len(ds.tensors) >= 2
            and ds.tensors[-1].ndim == 1
        ):
            labels = ds.tensors[-1].numpy()
        elif _is_hf_dataset(ds):
            key = find_target_key(list(ds.column_names), None, required=False)
            labels = _as_target_array(column_values(ds, key)) if key else None
    idx = calibration_indices(len(ds), max_samples, labels, random_state=random_state)
    logger.info(
        "dataloader is sequential over %d rows: drawing a seeded %s sample of %d",
        len(ds),
        "stratified" if labels is not None else "random",
        len(idx),
    )
    sub = torch.utils.data.DataLoader(
        torch.utils.data.Subset(ds, idx.tolist()),
        batch_size=loader.batch_size or 32,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        shuffle=False,
    )
    return sub, idx


def from_dataloader(
    loader: Any,
    *,
    get_processor: Callable[[str], Any],
    config: Any,
    task: str,
    target_key: str | None = None,
    text_key: Any = None,
    max_samples: int | None,
    max_length: int = 512,
    random_state: Any = 0,
    main_input_name: str = "input_ids",
    positional_names: Sequence[str] = (),
) -> CalibrationData:
    """Calibration data from a dataloader (or any iterable of batches)."""
    loader, indices = _subset_loader(loader, max_samples, random_state, task)
    require_targets = task != "label_free"
    state: dict[str, Any] = {}

    def make_batches() -> Iterator[Batch]:
        seen = 0
        row_shape = None
        for b, raw in enumerate(loader):
            inputs, targets = split_batch(
                raw, target_key=target_key, require_targets=require_targets
            )
            inputs = _inputs_dict(inputs, main_input_name, positional_names)
            inputs = _tokenize_raw(inputs, text_key, get_processor, config, max_length)
            n = _batch_size_of(inputs)
            if max_samples is not None and seen + n > max_samples:
                n = max_samples - seen
                inputs = {
                    k: (
                        v[:n]
                        if hasattr(v, "__getitem__") and not isinstance(v, (str, bytes))
                        else v
                    )
                    for k, v in inputs.items()
                }
                targets = targets[:n] if targets is not None else None
            tgt = None
            if targets is not None:
                tgt = (
                    targets.detach().cpu().numpy()
                    if torch.is_tensor(targets)
                    else _as_target_array(targets)
                )
                tgt = tgt.reshape(1) if tgt.ndim == 0 else tgt
                row_shape = tgt.shape[1:] if row_shape is None else row_shape
                if tgt.shape[1:] != row_shape or len(tgt) != n:
                    raise LOESError(
                        f"dataloader batch {b}: targets of shape {tuple(tgt.shape)} for {n} rows, but earlier "
                        f"batches had one target of shape {tuple(row_shape)} per row: yield targets of the "
                        "same shape in every batch"
                    )
            pos = np.arange(seen, seen + n)
            seen += n
            yield Batch(
                inputs=inputs, mask=inputs.get("attention_mask"), positions=pos, targets=tgt
            )
            if max_samples is not None and seen >= max_samples:
                state["truncated"] = True
                break
        state["seen"] = seen

    shuffled = isinstance(getattr(loader, "sampler", None), torch.utils.data.RandomSampler)
    return CalibrationData(
        batches=make_batches,
        modality="unknown",
        indices=indices,
        name="pytorch_dataloader",
        info={"state": state, "resampled": indices is not None or shuffled},
    )


def _inputs_dict(inputs: Any, main_input_name: str, positional: Sequence[str]) -> dict[str, Any]:
    if torch.is_tensor(inputs) or isinstance(inputs, np.ndarray):
        return {main_input_name: torch.as_tensor(inputs)}
    if isinstance(inputs, (tuple, list)) and inputs and all(torch.is_tensor(v) for v in inputs):
        names = [n for n in positional if n != "self"][: len(inputs)]
        if len(names) < len(inputs):
            raise LOESError(
                f"got {len(inputs)} positional inputs but the forward takes {list(positional)}"
            )
        return dict(zip(names, inputs))
    if hasattr(inputs, "keys"):
        return dict(inputs)
    raise LOESError(
        f"unsupported batch inputs of type {type(inputs).__name__}: yield tensors or dicts of tensors"
    )


def _tokenize_raw(
    inputs: dict[str, Any], text_key: Any, get_processor, config, max_length: int
) -> dict[str, Any]:
    """Dict batches of raw strings (no input_ids) go through the tokenizer; ragged lists are padded."""
    if any(k in inputs for k in ("input_ids", "pixel_values", "input_values", "input_features")):
        ragged = {
            k: v
            for k, v in inputs.items()
            if k in MODEL_INPUT_KEYS and isinstance(v, (list, tuple))
        }
        if ragged:
            tok = get_processor("text") if "input_ids" in ragged else None
            pad_id, side = tokenizer_padding(tok, config) if tok is not None else (0, "right")
            rows = [
                {k: v[i] for k, v in ragged.items()}
                for i in range(len(next(iter(ragged.values()))))
            ]
            inputs = {**inputs, **pad_rows(rows, pad_token_id=pad_id, padding_side=side)}
        return inputs
    keys = (text_key,) if isinstance(text_key, str) else tuple(text_key or ())
    if not keys:
        pair = next((p for p in TEXT_PAIR_KEYS if all(k in inputs for k in p)), None)
        keys = pair or tuple(k for k in TEXT_KEYS if k in inputs)[:1]
    if not keys or any(k not in inputs for k in keys):
        raise LOESError(
            f"batch has keys {sorted(inputs)} but no model inputs ({list(MODEL_INPUT_KEYS)}) "
            f"and no text column ({list(TEXT_KEYS)}): pass text_key=<key> or collate model inputs"
        )
    tok = get_processor("text")
    texts = _check_texts(list(inputs[keys[0]]), keys[0])
    pairs = _check_texts(list(inputs[keys[1]]), keys[1]) if len(keys) == 2 else None
    rows = tokenize(tok, texts, pairs, max_length)
    pad_id, side = tokenizer_padding(tok, config)
    return pad_rows(rows, pad_token_id=pad_id, padding_side=side)


def warn_dataloader_sample(data: CalibrationData, targets: np.ndarray | None, task: str) -> None:
    """After a dataloader run: say when the sample may be unrepresentative."""
    state = data.info.get("state", {})
    if state.get("truncated") and not data.info.get("resampled"):
        warnings.warn(
            f"took the first {state.get('seen')} samples of the dataloader in its own order; "
            "if it is sorted (e.g. by label), shuffle it or pass a map-style DataLoader "
            "(loes then draws a seeded random sample)",
            LOESWarning,
            stacklevel=4,
        )
    if (
        task == "classification"
        and targets is not None
        and targets.ndim == 1
        and len(np.unique(targets)) == 1
    ):
        warnings.warn(
            f"the calibration sample holds a single class ({targets[0]!r}): check the data order or labels",
            LOESWarning,
            stacklevel=4,
        )


# ----------------------------------------------------------------- streams
def _is_row(item: Any) -> bool:
    """A single row: a dict of scalars, strings, images, audio dicts or token-id lists, or a
    ``(text, label)`` pair; a batch has tensors or lists of strings instead."""
    if isinstance(item, (tuple, list)):
        return len(item) == 2 and isinstance(item[0], str)
    if not isinstance(item, dict) or not item:
        return False
    for v in item.values():
        if torch.is_tensor(v) or isinstance(v, np.ndarray) and v.ndim > 1:
            return False
        if isinstance(v, (list, tuple)) and any(isinstance(x, (str, list, tuple)) for x in v):
            return False
    return True


def as_row_stream(obj: Any) -> tuple[Any, bool]:
    """(the object, or an equivalent iterable if its first item had to be read; whether it is
    a stream of rows). ``datasets.IterableDataset`` always is; a DataLoader never is; any other
    iterable is when its first item is a row (:func:`_is_row`)."""
    if type(obj).__name__ == "IterableDataset" and type(obj).__module__.startswith("datasets"):
        return obj, True
    if isinstance(obj, torch.utils.data.DataLoader) or not is_dataloader(obj):
        return obj, False
    if isinstance(obj, Sequence):
        return obj, len(obj) > 0 and _is_row(obj[0])
    it = iter(obj)
    try:
        first = next(it)
    except StopIteration:
        return [], False
    return itertools.chain([first], it), _is_row(first)


def from_stream(
    stream: Any,
    *,
    task: str,
    target_key: str | None,
    max_samples: int | None,
    random_state: Any,
    **dataset_args: Any,
) -> CalibrationData:
    """Calibration data from a row stream (``datasets.IterableDataset`` or an iterable of dicts
    or ``(text, label)`` pairs), sampled in one pass (:func:`~loes.hf.sampling.stratified_reservoir`,
    stratified by class for classification); ``max_samples=None`` keeps every row.

    ``indices`` are the stream positions of the sampled rows.
    """
    datasets = require("datasets", extra="hf")
    features = getattr(stream, "features", None)
    state: dict[str, Any] = {}

    def rows() -> Iterator[dict[str, Any]]:
        for i, row in enumerate(stream):
            if isinstance(row, (tuple, list)):
                if not (len(row) == 2 and isinstance(row[0], str)):
                    raise LOESError(
                        f"stream row {i} is a {type(row).__name__} of length {len(row)}: yield "
                        "dicts of columns or (text, label) pairs"
                    )
                row = {"text": row[0], "label": row[1]}
            elif not isinstance(row, dict):
                raise LOESError(
                    f"stream row {i} is a {type(row).__name__}: yield dicts of columns or "
                    "(text, label) pairs"
                )
            if "key" not in state:
                state["key"] = find_target_key(list(row), target_key, required=task != "label_free")
            yield row

    def class_of(row: dict[str, Any]) -> Any:
        value = row.get(state["key"])
        if value is None:
            raise LOESError(
                f"a stream row has no value for the target {state['key']!r}: drop such rows first"
            )
        return value if isinstance(value, (str, int, float, bool, np.generic)) else repr(value)

    stratify = task == "classification"
    if max_samples is None:
        sample = list(rows())
        positions, n_rows = np.arange(len(sample), dtype=np.int64), len(sample)
    else:
        positions, sample, counts = stratified_reservoir(
            rows(), int(max_samples), class_of if stratify else None, random_state=random_state
        )
        n_rows = sum(counts.values())
    if not sample:
        raise LOESError("the stream yielded no rows")
    table = (
        datasets.Dataset.from_list(sample, features=features)
        if features is not None
        else datasets.Dataset.from_list(sample)
    )
    data = from_dataset(
        table,
        task=task,
        target_key=target_key,
        max_samples=None,
        random_state=random_state,
        **dataset_args,
    )
    data.indices = positions
    data.name = f"stream[{type(stream).__name__}]"
    data.info.update(n_rows=n_rows, sampling="stratified reservoir" if stratify else "reservoir")
    h = hashlib.sha256((data.fingerprint or "").encode())
    h.update(positions.tobytes())
    data.fingerprint = h.hexdigest()[:16]
    logger.info(
        "streamed %d rows in one pass; kept a seeded %s sample of %d",
        n_rows,
        data.info["sampling"],
        len(positions),
    )
    return data
