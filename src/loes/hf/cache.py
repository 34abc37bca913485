"""On-disk cache of extracted embeddings: a safetensors file plus a JSON sidecar.

Entries are keyed by a hash of everything that changes the features (model
name, revision, a fingerprint of the weights, the data's content fingerprint,
pooling, sample count, layer convention, dtype, ...). Files are written to a
temporary name and moved into place with :func:`os.replace`, so a reader never
sees a half-written entry; the safetensors metadata repeats the key, so a
mismatched pair is detected and treated as a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

from loes._deps import require

__all__ = ["cache_key", "default_cache_dir", "load_entry", "resolve_cache_dir", "save_entry"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """``$LOES_CACHE_DIR``, else ``$XDG_CACHE_HOME/loes``, else ``~/.cache/loes``."""
    if os.environ.get("LOES_CACHE_DIR"):
        return Path(os.environ["LOES_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "loes"


def resolve_cache_dir(cache_dir: Union[None, bool, str, os.PathLike]) -> Optional[Path]:
    """``None``/``False``: no cache; ``True``: :func:`default_cache_dir`; else that folder."""
    if cache_dir is None or cache_dir is False:
        return None
    if cache_dir is True:
        return default_cache_dir()
    return Path(cache_dir)


def cache_key(payload: Dict[str, Any]) -> str:
    text = json.dumps({"format": FORMAT_VERSION, **payload}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _paths(cache_dir: Path, key: str) -> Tuple[Path, Path]:
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


def save_entry(cache_dir: Path, key: str, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> Path:
    """Write one entry atomically; returns the safetensors path."""
    st = require("safetensors.torch", extra="hf", package="safetensors")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tensor_path, meta_path = _paths(cache_dir, key)
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    _atomic_write(tensor_path, lambda p: st.save_file(tensors, p, metadata={"key": key}))
    body = json.dumps({"key": key, "format": FORMAT_VERSION, **meta}, indent=1, default=_json_default)
    _atomic_write(meta_path, lambda p: Path(p).write_text(body, encoding="utf-8"))
    logger.info("cached embeddings at %s", tensor_path)
    return tensor_path


def load_entry(cache_dir: Path, key: str) -> Optional[Tuple[Dict[str, torch.Tensor], Dict[str, Any]]]:
    """``(tensors, meta)`` of an entry, or ``None`` when absent or unreadable."""
    tensor_path, meta_path = _paths(cache_dir, key)
    if not (tensor_path.exists() and meta_path.exists()):
        return None
    st = require("safetensors", extra="hf")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        with st.safe_open(str(tensor_path), framework="pt") as fh:
            if (fh.metadata() or {}).get("key") != key or meta.get("key") != key:
                logger.warning("cache entry %s is inconsistent; recomputing", tensor_path)
                return None
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except Exception as e:  # a corrupt file is a miss, not a failure
        logger.warning("could not read cache entry %s (%s); recomputing", tensor_path, e)
        return None
    logger.info("loaded cached embeddings from %s", tensor_path)
    return tensors, meta


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)
