"""The one reader of user files: embeddings, targets and JSON results.

Every command of the CLI reads its input files here, so they all accept the
same formats and a malformed file is a :class:`~loes.LOESError` naming the
file and the problem, never a numpy, pickle or zip traceback.

Formats, chosen by suffix:

- ``.npy``: one array, the embeddings ``(N, L, D)`` (or, as a targets file,
  the targets ``(N,)``). Pickled object arrays are refused.
- ``.npz``, ``.safetensors``, ``.pt``/``.pth``: named arrays. The embeddings
  are the entry named ``embeddings`` (or ``x``, ``hidden_states``), else the
  only 3-D entry; targets, if present, the entry named ``targets`` (or ``y``,
  ``labels``, ``label``). loes's own embedding cache files
  (``~/.cache/loes/*.safetensors``) are of this kind.
- A feature-store folder (:mod:`loes.store`, written by ``loes extract``):
  every stored layer and the targets, read with :func:`loes.store.load_features`. ``.pt`` files are read
  with ``torch.load(weights_only=True)``: tensors only, no code.
- Targets alone may also come from UTF-8 text: ``.txt`` holds one value per
  line; ``.csv``/``.tsv`` with one column likewise (an optional header named
  like a target column is skipped); with several columns the first row is a
  header and the column named ``label``/``labels``/``target``/``targets``/``y``
  (or ``column``) is read; ``.json`` holds a list, or an object with a targets
  entry. Values parse as integers, else floats, else strings.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loes._deps import require
from loes._exceptions import LOESError
from loes.store import MANIFEST, load_features

__all__ = [
    "EMBEDDING_SUFFIXES",
    "TARGET_SUFFIXES",
    "load_embeddings_file",
    "load_json_file",
    "load_targets_file",
]

EMBEDDING_KEYS = ("embeddings", "x", "hidden_states")
TARGET_KEYS = ("targets", "y", "labels", "label")
TARGET_COLUMNS = ("label", "labels", "target", "targets", "y")
EMBEDDING_SUFFIXES = (".npy", ".npz", ".safetensors", ".pt", ".pth")
TARGET_SUFFIXES = EMBEDDING_SUFFIXES + (".txt", ".csv", ".tsv", ".json")


def _existing_file(path: Any, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise LOESError(f"{what} file not found: {path}; check the path")
    if path.is_dir():
        raise LOESError(f"{what} file {path} is a directory; give a file")
    return path


def _read_npy(path: Path) -> np.ndarray:
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic[:2] == b"PK":  # an .npz saved under a .npy name
        raise LOESError(f"{path}: is an .npz archive, not a .npy array; rename it to .npz")
    if magic != b"\x93NUMPY":
        raise LOESError(
            f"{path}: not a .npy file (no NumPy header); save the array with numpy.save"
        )
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        problem = (
            "holds pickled Python objects, which loes does not load"
            if "pickle" in str(e)
            else (f"not a readable .npy file ({e})")
        )
        raise LOESError(f"{path}: {problem}; save a numeric array with numpy.save") from e


def _read_named(path: Path) -> dict[str, Any]:
    """The named arrays of an .npz, .safetensors or .pt file."""
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return {name: z[name] for name in z.files}
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise LOESError(
                f"{path}: not a readable .npz archive ({e}); save numeric arrays with numpy.savez"
            ) from e
    if suffix == ".safetensors":
        st = require("safetensors.torch", extra="hf", package="safetensors")
        try:
            return dict(st.load_file(str(path)))
        except Exception as e:  # safetensors raises its own SafetensorError and others
            raise LOESError(
                f"{path}: not a readable safetensors file ({e}); write it with safetensors.torch.save_file"
            ) from e
    if suffix in (".pt", ".pth"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError, ...
            raise LOESError(
                f"{path}: not a readable torch file of tensors ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); save a tensor or a dict of tensors "
                "with torch.save (loes loads it with weights_only=True)"
            ) from e
        if isinstance(obj, torch.Tensor):
            return {"embeddings": obj}
        if isinstance(obj, dict):
            named = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if named:
                return named
        raise LOESError(
            f"{path}: expected a tensor or a dict of tensors; found {type(obj).__name__}; "
            "save tensors with torch.save({'embeddings': x, 'targets': y})"
        )
    raise LOESError(
        f"{path}: unsupported file type {suffix!r}; use one of {', '.join(EMBEDDING_SUFFIXES)}"
    )


def _check_features(x: Any, path: Path, entry: str) -> None:
    if isinstance(x, torch.Tensor):
        real = not (x.dtype.is_complex or x.dtype == torch.bool)
    else:
        real = np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
    if not real:
        raise LOESError(f"{path}: {entry} has dtype {x.dtype}; embeddings must be real numbers")
    if x.ndim != 3:
        hint = ": for a single layer save X[:, None, :]" if x.ndim == 2 else ""
        raise LOESError(
            f"{path}: {entry} must have shape (n_samples, n_layers, dim); got shape {tuple(x.shape)}{hint}"
        )


def load_embeddings_file(path: Any, key: str | None = None) -> tuple[Any, Any | None]:
    """Read ``(embeddings, targets or None)`` from a file (see the module docstring).

    Parameters
    ----------
    path : str or path
        An ``.npy``, ``.npz``, ``.safetensors`` or ``.pt``/``.pth`` file, or a
        feature-store folder (``key`` does not apply).
    key : str, optional
        The entry holding the embeddings when the file holds several.

    Returns
    -------
    embeddings : numpy array or torch tensor of shape (n_samples, n_layers, dim)
    targets : array or tensor of shape (n_samples,), or None
        The file's targets entry, if it has one.
    """
    if Path(path).is_dir() and (
        (Path(path) / MANIFEST).exists() or any(Path(path).glob("shard-*.safetensors"))
    ):
        if key is not None:
            raise LOESError(f"{path} is a feature store: it has no entries to pick with a key")
        return load_features(path).load()
    path = _existing_file(path, "embeddings")
    if path.suffix.lower() == ".npy":
        emb = _read_npy(path)
        _check_features(emb, path, "the array")
        return emb, None
    named = _read_named(path)
    if key is not None:
        if key not in named:
            raise LOESError(f"{path}: no entry {key!r}; entries: {sorted(named)}")
        found = key
    else:
        known = [k for k in EMBEDDING_KEYS if k in named]
        three_d = [k for k, v in named.items() if getattr(v, "ndim", 0) == 3]
        if known:
            found = known[0]
        elif len(three_d) == 1:
            found = three_d[0]
        else:
            raise LOESError(
                f"{path}: cannot tell which entry holds the (N, L, D) embeddings among {sorted(named)}; "
                "name it 'embeddings' or pass --embeddings-key"
            )
    _check_features(named[found], path, f"entry {found!r}")
    return named[found], _find_targets(named)


def _find_targets(named: dict[str, Any], column: str | None = None) -> Any | None:
    if column is not None:
        return named.get(column)
    return next((named[k] for k in TARGET_KEYS if k in named), None)


def _parse_values(values: list[str]) -> np.ndarray:
    for cast in (int, float):
        try:
            return np.array([cast(v) for v in values])
        except ValueError:
            pass
    return np.array(values)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise LOESError(
            f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
            "save the file as UTF-8"
        ) from e


def _text_targets(path: Path, column: str | None) -> np.ndarray:
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        rows = [[line.strip()] for line in text.splitlines()]
    else:
        try:
            rows = [
                [v.strip() for v in row]
                for row in csv.reader(
                    io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ","
                )
            ]
        except csv.Error as e:
            raise LOESError(f"{path}: not a readable {suffix} table ({e})") from e
    while rows and not any(rows[-1]):
        rows.pop()  # trailing blank lines
    if not rows:
        raise LOESError(f"{path}: no targets (the file is empty)")
    if len(rows[0]) == 1 and column is None:
        offset = 1
        if suffix != ".txt" and rows[0][0].lower() in TARGET_COLUMNS:
            rows, offset = rows[1:], 2  # a one-column table with a header
        values = [row[0] if row else "" for row in rows]
    else:
        header = rows[0]
        if column is not None:
            if column not in header:
                raise LOESError(f"{path}: no column {column!r}; the header has columns {header}")
            col = header.index(column)
        else:
            named = [i for i, name in enumerate(header) if name.lower() in TARGET_COLUMNS]
            if len(named) != 1:
                raise LOESError(
                    f"{path}: a table with columns {header}; pass --targets-column NAME to say which "
                    "holds the targets (or name it 'label')"
                )
            col = named[0]
        short = next((i for i, row in enumerate(rows) if len(row) != len(header)), None)
        if short is not None:
            raise LOESError(
                f"{path}: line {short + 1} has {len(rows[short])} fields, the header has {len(header)}; "
                "fix the table (quote values that hold the delimiter)"
            )
        values = [row[col] for row in rows[1:]]
        offset = 2
    blank = next((i for i, v in enumerate(values) if v == ""), None)
    if blank is not None:
        raise LOESError(
            f"{path}: line {blank + offset} has no value; every sample needs a target "
            "(a blank line would shift every later target)"
        )
    if not values:
        raise LOESError(f"{path}: no targets (only a header)")
    return _parse_values(values)


def load_targets_file(path: Any, column: str | None = None) -> Any:
    """Read targets from a file (see the module docstring).

    Parameters
    ----------
    path : str or path
        ``.npy``/``.npz``/``.safetensors``/``.pt`` arrays, or ``.txt``/``.csv``/``.tsv``/``.json`` text.
    column : str, optional
        The table column (``.csv``/``.tsv``) or entry (other formats) holding the targets.

    Returns
    -------
    array or tensor of shape (n_samples,) (or (n_samples, n_outputs) for regression)
    """
    path = _existing_file(path, "targets")
    suffix = path.suffix.lower()
    if suffix not in TARGET_SUFFIXES:
        raise LOESError(
            f"{path}: unsupported targets file type {suffix!r}; use one of {', '.join(TARGET_SUFFIXES)}"
        )
    if suffix == ".npy":
        return _read_npy(path)
    if suffix in (".npz", ".safetensors", ".pt", ".pth"):
        named = _read_named(path)
        targets = _find_targets(named, column)
        if targets is None:
            looked = [column] if column is not None else list(TARGET_KEYS)
            raise LOESError(
                f"{path}: no targets entry (looked for {looked}); entries: {sorted(named)}"
            )
        return targets
    if suffix == ".json":
        obj = load_json_file(path, "targets")
        if isinstance(obj, dict):
            found = _find_targets(obj, column)
            if found is None:
                raise LOESError(
                    f"{path}: no targets entry (looked for {list(TARGET_KEYS)}); keys: {sorted(obj)}"
                )
            obj = found
        if not isinstance(obj, list) or not obj:
            raise LOESError(
                f"{path}: expected a non-empty JSON list of targets; got {type(obj).__name__}"
            )
        try:
            out = np.array(obj)
        except ValueError as e:
            raise LOESError(f"{path}: targets of uneven length ({e})") from e
        if out.dtype == object:
            raise LOESError(
                f"{path}: targets must be numbers or strings of one shape; got mixed values"
            )
        return out
    return _text_targets(path, column)


def load_json_file(path: Any, what: str) -> Any:
    """Parse a UTF-8 JSON file; a malformed one is a :class:`LOESError` with its line and column.

    Parameters
    ----------
    path : str or path
    what : str
        What the file should be (``"LOESResult"``), for the messages.
    """
    path = _existing_file(path, what)
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LOESError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
            f"give a {what} JSON file"
        ) from e
