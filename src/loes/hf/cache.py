"""On-disk cache of extracted embeddings: a safetensors file plus a JSON sidecar.

Entries are keyed by a hash of everything that determines the features (see
:mod:`loes.hf.fingerprint`). Files are written to a temporary name and moved
into place with :func:`os.replace`, so a reader never sees a half-written
entry; the safetensors metadata repeats the key, so a mismatched pair is a
miss. Every read checks the tensors against the shapes and dtypes the sidecar
recorded and against what the caller expects; any mismatch, unreadable file or
missing sidecar field is a miss (logged), never an error. Temporary files left
by killed runs are removed once they are older than :data:`ORPHAN_AGE_S`, and
an optional size cap (``max_bytes`` or ``$LOES_CACHE_MAX_BYTES``) evicts the
least recently used entries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from loes._deps import require
from loes._exceptions import LOESError
from loes._json import dumps

__all__ = [
    "cache_key",
    "default_cache_dir",
    "load_entry",
    "resolve_cache_dir",
    "resolve_max_bytes",
    "save_entry",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
#: Temporary files older than this (seconds) are orphans of killed runs.
ORPHAN_AGE_S = 3600.0
#: Sidecar fields a reader relies on.
REQUIRED_FIELDS = ("key", "format", "layer_names", "pooling", "shapes")


def default_cache_dir() -> Path:
    """``$LOES_CACHE_DIR``, else ``$XDG_CACHE_HOME/loes``, else ``~/.cache/loes``."""
    if os.environ.get("LOES_CACHE_DIR"):
        return Path(os.environ["LOES_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "loes"


def resolve_cache_dir(cache_dir: None | bool | str | os.PathLike) -> Path | None:
    """``None``/``False``: no cache; ``True``: :func:`default_cache_dir`; else that folder."""
    if cache_dir is None or cache_dir is False:
        return None
    if cache_dir is True:
        return default_cache_dir()
    if not isinstance(cache_dir, (str, os.PathLike)):
        raise LOESError(
            f"cache_dir must be None, True/False or a folder path; got {type(cache_dir).__name__}"
        )
    return Path(cache_dir)


def resolve_max_bytes(max_bytes: int | None) -> int | None:
    """The size cap: ``max_bytes``, else ``$LOES_CACHE_MAX_BYTES``, else none."""
    if max_bytes is None:
        env = os.environ.get("LOES_CACHE_MAX_BYTES")
        if not env:
            return None
        try:
            max_bytes = int(env)
        except ValueError:
            raise LOESError(
                f"LOES_CACHE_MAX_BYTES must be an integer number of bytes; got {env!r}"
            ) from None
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise LOESError(
            f"cache_max_bytes must be a non-negative integer or None; got {max_bytes!r}"
        )
    return max_bytes


def cache_key(payload: dict[str, Any]) -> str:
    """32 hex digits of the SHA-256 of ``payload`` as canonical JSON."""
    text = json.dumps({"format": FORMAT_VERSION, **payload}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    return cache_dir / f"{key}.safetensors", cache_dir / f"{key}.json"


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_orphans(cache_dir: Path, max_age_s: float = ORPHAN_AGE_S) -> int:
    """Delete ``.*.tmp`` files older than ``max_age_s`` (left by killed runs); returns the count."""
    now, removed = time.time(), 0
    for path in cache_dir.glob(".*.tmp"):
        try:
            if now - path.stat().st_mtime > max_age_s:
                path.unlink()
                removed += 1
        except OSError:  # another process got there first
            continue
    if removed:
        logger.info("removed %d orphan temporary file(s) from %s", removed, cache_dir)
    return removed


def _evict(cache_dir: Path, max_bytes: int, keep: str) -> None:
    """Delete least recently used entries (by mtime, refreshed on every hit) until under ``max_bytes``."""
    entries: dict[str, tuple[float, int]] = {}
    for path in list(cache_dir.glob("*.safetensors")) + list(cache_dir.glob("*.json")):
        try:
            st = path.stat()
        except OSError:
            continue
        last, size = entries.get(path.stem, (0.0, 0))
        entries[path.stem] = (max(last, st.st_mtime), size + st.st_size)
    total = sum(size for _, size in entries.values())
    for key, (_, size) in sorted(entries.items(), key=lambda kv: kv[1][0]):
        if total <= max_bytes:
            break
        if key == keep:
            continue
        for path in _paths(cache_dir, key):
            path.unlink(missing_ok=True)
        total -= size
        logger.info("cache over %d bytes: evicted least recently used entry %s", max_bytes, key)
    if total > max_bytes:
        logger.warning(
            "the newest cache entry alone (%d bytes) exceeds cache_max_bytes=%d", total, max_bytes
        )


def save_entry(
    cache_dir: Path,
    key: str,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    *,
    max_bytes: int | None = None,
) -> Path:
    """Write one entry atomically, recording each tensor's shape and dtype; returns the safetensors path."""
    st = require("safetensors.torch", extra="hf", package="safetensors")
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_orphans(cache_dir)
    tensor_path, meta_path = _paths(cache_dir, key)
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    shapes = {name: {"shape": list(t.shape), "dtype": str(t.dtype)} for name, t in tensors.items()}
    _atomic_write(tensor_path, lambda p: st.save_file(tensors, p, metadata={"key": key}))
    body = dumps({"key": key, "format": FORMAT_VERSION, "shapes": shapes, **meta}, indent=1)
    _atomic_write(meta_path, lambda p: Path(p).write_text(body, encoding="utf-8"))
    logger.info("cached embeddings at %s", tensor_path)
    if max_bytes is not None:
        _evict(cache_dir, max_bytes, keep=key)
    return tensor_path


def _mismatch(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], n_samples: int | None
) -> str | None:
    """Why an entry cannot be the features it claims to be, or None."""
    missing = [f for f in REQUIRED_FIELDS if f not in meta]
    if missing:
        return f"sidecar lacks {missing}"
    if meta["format"] != FORMAT_VERSION:
        return f"format {meta['format']} (expected {FORMAT_VERSION})"
    recorded = meta["shapes"]
    if not isinstance(recorded, dict) or set(recorded) != set(tensors):
        return f"tensors {sorted(tensors)} differ from the recorded {sorted(recorded or {})}"
    for name, t in tensors.items():
        want = recorded[name]
        if (
            not isinstance(want, dict)
            or list(t.shape) != want.get("shape")
            or str(t.dtype) != want.get("dtype")
        ):
            return f"{name} is {tuple(t.shape)} {t.dtype}, the sidecar recorded {want}"
    n_layers = len(meta["layer_names"])
    feats = (
        [tensors["embeddings"]]
        if "embeddings" in tensors
        else [t for name, t in tensors.items() if name.startswith("layer_")]
    )
    if not feats:
        return "no feature tensors"
    if "embeddings" in tensors:
        e = tensors["embeddings"]
        if e.ndim != 3 or e.shape[1] != n_layers:
            return f"embeddings of shape {tuple(e.shape)} for {n_layers} layer names"
    elif len(feats) != n_layers or any(t.ndim != 2 for t in feats):
        return f"{len(feats)} per-layer tensors for {n_layers} layer names"
    if any(t.dtype != torch.float32 for t in feats):
        return "features are not float32"
    rows = {int(t.shape[0]) for t in feats}
    if n_samples is not None and rows != {n_samples}:
        return f"{sorted(rows)} rows, expected {n_samples}"
    if len(rows) != 1:
        return f"layers disagree on the number of rows {sorted(rows)}"
    for name in ("targets", "indices"):
        if name in tensors and (tensors[name].ndim == 0 or tensors[name].shape[0] not in rows):
            return f"{name} of shape {tuple(tensors[name].shape)} for {sorted(rows)} rows"
    return None


def load_entry(
    cache_dir: Path, key: str, *, n_samples: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """``(tensors, meta)`` of an entry, or ``None`` when absent, unreadable or inconsistent.

    ``n_samples`` is the row count the caller expects (None: unknown). A hit
    refreshes the entry's mtime (the least-recently-used order of the size cap).
    """
    if cache_dir.is_dir():
        remove_orphans(cache_dir)
    tensor_path, meta_path = _paths(cache_dir, key)
    if not (tensor_path.exists() and meta_path.exists()):
        return None
    st = require("safetensors", extra="hf")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("the sidecar is not a JSON object")
        with st.safe_open(str(tensor_path), framework="pt") as fh:
            if (fh.metadata() or {}).get("key") != key or meta.get("key") != key:
                logger.warning("cache entry %s is inconsistent; recomputing", tensor_path)
                return None
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except Exception as e:  # a corrupt file is a miss, not a failure
        logger.warning("could not read cache entry %s (%s); recomputing", tensor_path, e)
        return None
    why = _mismatch(tensors, meta, n_samples)
    if why is not None:
        logger.warning(
            "cache entry %s does not match its record (%s); recomputing", tensor_path, why
        )
        return None
    for path in (tensor_path, meta_path):
        try:
            os.utime(path)
        except OSError:
            pass
    logger.info("loaded cached embeddings from %s", tensor_path)
    return tensors, meta
