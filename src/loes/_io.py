"""Reading precomputed embeddings and targets from files (for ``loes select --embeddings``).

Formats, chosen by suffix:

- ``.npy``: one array, the embeddings ``(N, L, D)``.
- ``.npz``, ``.safetensors``, ``.pt``/``.pth``: named arrays. The embeddings
  are the entry named ``embeddings`` (or ``x``, ``hidden_states``), else the
  only 3-D entry; targets, if present, the entry named ``targets`` (or ``y``,
  ``labels``, ``label``). loes's own embedding cache files
  (``~/.cache/loes/*.safetensors``) are of this kind.
- Targets alone may also come from ``.npy`` or a text file (``.txt``,
  ``.csv``, ``.tsv``: one value per line; integers, else floats, where every
  line parses as one, else strings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from loes._deps import require
from loes._exceptions import LOESError

__all__ = ["load_embeddings_file", "load_targets_file"]

EMBEDDING_KEYS = ("embeddings", "x", "hidden_states")
TARGET_KEYS = ("targets", "y", "labels", "label")


def _read_named(path: Path) -> Dict[str, Any]:
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    if suffix == ".safetensors":
        st = require("safetensors.numpy", extra="hf", package="safetensors")
        return dict(st.load_file(str(path)))
    if suffix in (".pt", ".pth"):
        import torch

        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(obj, torch.Tensor):
            return {"embeddings": obj}
        if isinstance(obj, dict):
            return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        raise LOESError(f"{path}: expected a tensor or a dict of tensors; found {type(obj).__name__}")
    raise LOESError(f"{path}: unsupported file type {suffix!r} (use .npy, .npz, .safetensors or .pt)")


def load_embeddings_file(path: Any, key: Optional[str] = None) -> Tuple[Any, Optional[Any]]:
    """``(embeddings, targets or None)`` from a file (see the module docstring).

    ``key`` names the embeddings entry when the file holds several 3-D arrays.
    """
    path = Path(path)
    if not path.exists():
        raise LOESError(f"embeddings file not found: {path}")
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False), None
    named = _read_named(path)
    if key is not None:
        if key not in named:
            raise LOESError(f"{path}: no entry {key!r}; entries: {sorted(named)}")
        emb = named[key]
    else:
        found = [k for k in EMBEDDING_KEYS if k in named]
        if found:
            emb = named[found[0]]
        else:
            three_d = [k for k, v in named.items() if getattr(v, "ndim", 0) == 3]
            if len(three_d) != 1:
                raise LOESError(
                    f"{path}: cannot tell which entry holds the (N, L, D) embeddings among {sorted(named)}; "
                    "name it 'embeddings' or pass --embeddings-key"
                )
            emb = named[three_d[0]]
    return emb, _find_targets(named)


def _find_targets(named: Dict[str, Any]) -> Optional[Any]:
    return next((named[k] for k in TARGET_KEYS if k in named), None)


def load_targets_file(path: Any) -> np.ndarray:
    """Targets from ``.npy`` or a text file with one value per line."""
    path = Path(path)
    if not path.exists():
        raise LOESError(f"targets file not found: {path}")
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix.lower() in (".npz", ".safetensors", ".pt", ".pth"):
        named = _read_named(path)
        targets = _find_targets(named)
        if targets is not None:
            return targets
        raise LOESError(f"{path}: no targets entry (looked for {list(TARGET_KEYS)}); entries: {sorted(named)}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise LOESError(f"{path}: no targets (the file is empty)")
    for cast in (int, float):
        try:
            return np.array([cast(v) for v in lines])
        except ValueError:
            pass
    return np.array(lines)
