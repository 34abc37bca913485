"""A feature store: pooled layer features of any number of rows, in sharded safetensors.

Extraction that does not fit in memory, or runs on several workers
(:func:`loes.hf.export_features`, :func:`loes.distributed.extract`), writes a
folder::

    features/
      manifest.json              written last: the layers, widths, rows and shards
      shard-00000.safetensors    rows [0, shard_rows)
      shard-00001.safetensors    rows [shard_rows, 2 * shard_rows)
      ...

Each shard holds one float tensor per stored layer (``layer_0000``,
``layer_0001``, ... of shape ``(n, D_l)``, the names of loes's embedding cache
entries), the global row numbers (``indices``, int64) and the targets when
there are any (``targets``; non-numeric labels go to the shard's metadata). A
shard is written to a temporary file and renamed, so a shard file is either
complete or absent; its metadata carries the writer's *plan* (a hash of the
settings that determine the features), so an interrupted run resumes by
skipping the finished shards and never mixes shards of different settings.

:func:`load_features` opens a finished store lazily: shards are memory-mapped
and only the requested rows and layers are read.

>>> import numpy as np, tempfile
>>> folder = tempfile.mkdtemp()
>>> w = FeatureWriter(folder, layers=[3, 7], widths=[4, 4], shard_rows=5, plan={"model": "m"})
>>> x = np.arange(7 * 2 * 4, dtype=np.float32).reshape(7, 2, 4)
>>> for shard in w.pending(7):
...     rows = w.shard_rows_of(shard, 7)
...     _ = w.write(shard, [x[rows, 0], x[rows, 1]], targets=np.arange(7)[rows])
>>> store = w.finish(7)
>>> len(store), store.layers, store.widths
(7, [3, 7], [4, 4])
>>> [xb.shape for xb, yb in store.batches(4)]
[torch.Size([4, 2, 4]), torch.Size([3, 2, 4])]
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loes._deps import require
from loes._exceptions import LOESError
from loes._json import dumps
from loes._naming import layer_label
from loes._rng import RandomState, check_random_state

__all__ = ["FORMAT", "FeatureStore", "FeatureWriter", "is_store", "load_features", "plan_hash"]

FORMAT = "loes-features"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def plan_hash(plan: dict[str, Any]) -> str:
    """A short, stable hash of the JSON-able settings that determine the features."""
    return hashlib.sha256(dumps(plan, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


def _layer_key(j: int) -> str:
    return f"layer_{j:04d}"


def is_store(path: Any) -> bool:
    """Whether ``path`` is a folder holding a feature store's manifest."""
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def _safetensors():
    return require("safetensors.torch", extra="hf", package="safetensors")


def _shard_meta(path: Path) -> dict[str, str] | None:
    """The metadata of a complete shard file, or None when it is unreadable."""
    safe_open = require("safetensors", extra="hf").safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # a truncated or foreign file: not a finished shard
        return None


class FeatureWriter:
    """Writes the shards and the manifest of one feature store.

    Picklable (a path and settings), so each worker of a distributed run can
    write its own shards; shards are independent files and may be written in
    any order, by any process.

    Parameters
    ----------
    path : str or path-like
        The store's folder (created if needed).
    layers : sequence of int
        Model layer indices stored, in order (shard tensor ``layer_000j`` is ``layers[j]``).
    widths : sequence of int
        Feature width of each stored layer.
    shard_rows : int
        Rows per shard; shard ``s`` holds rows ``[s * shard_rows, (s + 1) * shard_rows)``.
    plan : dict
        JSON-able settings that determine the features (model fingerprint,
        pooling, max_length, dataset, ...). Existing shards written under
        another plan are an error unless ``overwrite=True`` (then they are removed).
    layer_names : sequence of str, optional
        The model's name of every layer, indexed like the layer indices
        (``layer_names[7] == "hidden_states[8]"``), for labels.
    dtype : {"float32", "float16", "bfloat16"}
        Storage dtype of the features.
    overwrite : bool
        Remove an existing store of another plan instead of refusing.
    """

    def __init__(
        self,
        path: Any,
        *,
        layers: Sequence[int],
        widths: Sequence[int],
        shard_rows: int,
        plan: dict[str, Any],
        layer_names: Sequence[str] | None = None,
        dtype: str = "float32",
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        self.layers = [int(i) for i in layers]
        self.widths = [int(d) for d in widths]
        if not self.layers or len(self.layers) != len(self.widths):
            raise LOESError(
                f"a feature store needs one width per layer; got {len(self.layers)} layers and "
                f"{len(self.widths)} widths"
            )
        if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
            raise LOESError(f"shard_rows must be a positive int; got {shard_rows!r}")
        if dtype not in DTYPES:
            raise LOESError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
        self.shard_rows = shard_rows
        self.dtype = dtype
        self.layer_names = list(layer_names) if layer_names is not None else None
        self.plan = dict(plan)
        self.plan_id = plan_hash(
            {"plan": self.plan, "layers": self.layers, "rows": shard_rows, "dtype": dtype}
        )
        if self.path.exists() and not self.path.is_dir():
            raise LOESError(f"feature store path {self.path} is a file; give a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        self._check_existing(overwrite)

    def _check_existing(self, overwrite: bool) -> None:
        foreign = [
            p
            for p in sorted(self.path.glob("shard-*.safetensors"))
            if (_shard_meta(p) or {}).get("plan") != self.plan_id
        ]
        if foreign and not overwrite:
            raise LOESError(
                f"{self.path} holds {len(foreign)} shard(s) written with other settings (model, "
                "layers, pooling, shard size or dtype differ); choose another folder or pass "
                "overwrite=True to replace them"
            )
        for p in foreign:
            p.unlink()
        if foreign:
            (self.path / MANIFEST).unlink(missing_ok=True)

    def n_shards(self, n_rows: int) -> int:
        return -(-int(n_rows) // self.shard_rows)

    def shard_rows_of(self, shard: int, n_rows: int) -> slice:
        """The global rows of shard ``shard`` in a store of ``n_rows`` rows."""
        return slice(shard * self.shard_rows, min((shard + 1) * self.shard_rows, int(n_rows)))

    def done(self, shard: int, data: str | None = None) -> bool:
        """Whether shard ``shard`` is already written under this plan (and, when ``data`` is
        given, from rows of that content fingerprint; see :meth:`write`)."""
        path = self.path / _shard_name(shard)
        meta = _shard_meta(path) if path.is_file() else None
        return (
            meta is not None
            and meta.get("plan") == self.plan_id
            and (data is None or meta.get("data") == data)
        )

    def pending(self, n_rows: int) -> list[int]:
        """The shards of an ``n_rows`` store that are still to be written."""
        return [s for s in range(self.n_shards(n_rows)) if not self.done(s)]

    def write(
        self,
        shard: int,
        features: Sequence[Any],
        *,
        targets: Any = None,
        indices: Any = None,
        data: str | None = None,
    ) -> Path:
        """Write one shard atomically.

        Parameters
        ----------
        shard : int
        features : sequence of arrays of shape (n, D_l), one per stored layer
            (or one array of shape (n, L, D)).
        targets : array of shape (n,) or (n, m), optional
        indices : int array of shape (n,), optional
            Global row numbers (default: the shard's rows in order).
        data : str, optional
            A fingerprint of the shard's input rows, kept in its metadata and
            checked by :meth:`done` (a shard whose rows changed is not done).
        """
        if torch.is_tensor(features) or isinstance(features, np.ndarray):
            features = [features[:, j] for j in range(features.shape[1])]
        parts = [torch.as_tensor(np.asarray(f) if not torch.is_tensor(f) else f) for f in features]
        if len(parts) != len(self.layers):
            raise LOESError(f"shard {shard}: got {len(parts)} layers, expected {len(self.layers)}")
        n = int(parts[0].shape[0])
        for j, (p, d) in enumerate(zip(parts, self.widths)):
            if p.ndim != 2 or p.shape != (n, d):
                raise LOESError(
                    f"shard {shard}: layer {self.layers[j]} has shape {tuple(p.shape)}, "
                    f"expected ({n}, {d})"
                )
        dt = DTYPES[self.dtype]
        tensors = {
            _layer_key(j): p.detach().to("cpu", dt).contiguous() for j, p in enumerate(parts)
        }
        start = shard * self.shard_rows
        idx = np.arange(start, start + n) if indices is None else np.asarray(indices)
        tensors["indices"] = torch.as_tensor(idx.astype(np.int64))
        meta = {"plan": self.plan_id, "shard": str(shard), "rows": str(n)}
        if data is not None:
            meta["data"] = str(data)
        if targets is not None:
            t = np.asarray(targets)
            if t.shape[0] != n:
                raise LOESError(f"shard {shard}: {t.shape[0]} targets for {n} rows")
            if t.dtype.kind in "biuf":
                tensors["targets"] = torch.as_tensor(t.copy())
            else:
                meta["targets"] = json.dumps([str(v) for v in t.tolist()])
        final = self.path / _shard_name(shard)
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=final.name, suffix=".tmp")
        os.close(fd)
        try:
            _safetensors().save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return final

    def finish(self, n_rows: int, info: dict[str, Any] | None = None) -> FeatureStore:
        """Check that every shard is written, write the manifest and open the store."""
        missing = self.pending(n_rows)
        if missing:
            raise LOESError(
                f"{self.path}: {len(missing)} of {self.n_shards(n_rows)} shards are not written "
                f"yet (first: {missing[0]}); run the extraction again to finish them"
            )
        shards = []
        for s in range(self.n_shards(n_rows)):
            rows = self.shard_rows_of(s, n_rows)
            shards.append(
                {"file": _shard_name(s), "start": rows.start, "rows": rows.stop - rows.start}
            )
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "plan_id": self.plan_id,
            "plan": self.plan,
            "layers": self.layers,
            "layer_names": self.layer_names,
            "widths": self.widths,
            "dtype": self.dtype,
            "n_rows": int(n_rows),
            "shard_rows": self.shard_rows,
            "shards": shards,
            "info": info or {},
        }
        target = self.path / MANIFEST
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=MANIFEST, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(dumps(manifest, indent=1))
        os.replace(tmp, target)
        return FeatureStore(self.path)


class FeatureStore:
    """A finished feature store, read lazily (see :func:`load_features`).

    Attributes
    ----------
    path : Path
    layers : list of int
        The model layers stored, in order.
    widths : list of int
    layer_names : list of str or None
        The model's name of every layer, indexed like the layer indices.
    plan, info : dict
        The extraction settings and run information from the manifest.
    """

    def __init__(self, path: Any) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            hint = (
                "; its extraction did not finish: run it again to complete it"
                if any(self.path.glob("shard-*.safetensors"))
                else ""
            )
            raise LOESError(f"{self.path} is not a feature store (no {MANIFEST}){hint}")
        try:
            m = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LOESError(f"{manifest_path}: not a readable manifest ({e})") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise LOESError(f"{manifest_path} is not a loes feature-store manifest")
        if m.get("version") != VERSION:
            raise LOESError(
                f"{manifest_path}: feature-store version {m.get('version')}, this loes reads "
                f"version {VERSION}; extract again"
            )
        self.manifest = m
        self.layers: list[int] = list(m["layers"])
        self.widths: list[int] = list(m["widths"])
        self.layer_names: list[str] | None = m.get("layer_names")
        self.plan: dict[str, Any] = m.get("plan") or {}
        self.info: dict[str, Any] = m.get("info") or {}
        self._shards = m["shards"]
        self._starts = np.array([s["start"] for s in self._shards], dtype=np.int64)
        for s in self._shards:
            if not (self.path / s["file"]).is_file():
                raise LOESError(f"{self.path}: shard {s['file']} listed in the manifest is missing")

    def __len__(self) -> int:
        return int(self.manifest["n_rows"])

    def __iter__(self) -> Iterator[tuple]:
        """``(x, y)`` batches of 1,024 rows in order (:meth:`batches`); a store is re-iterable."""
        return self.batches()

    @functools.cached_property
    def targets(self) -> np.ndarray | None:
        """Every row's target in row order (read once from the shards, without their features)."""
        safe_open = require("safetensors", extra="hf").safe_open
        parts = []
        for shard in self._shards:
            with safe_open(str(self.path / shard["file"]), framework="pt") as f:
                parts.append(_shard_targets(f))
        return None if any(p is None for p in parts) else np.concatenate(parts)

    @property
    def classes(self) -> list | None:
        """The sorted distinct targets (the class list of a classification store), or None."""
        t = self.targets
        return None if t is None else np.unique(t).tolist()

    def __repr__(self) -> str:
        return (
            f"FeatureStore({str(self.path)!r}, rows={len(self)}, layers={self.layers}, "
            f"shards={len(self._shards)})"
        )

    @property
    def labels(self) -> list[str]:
        """Display labels of the stored layers, e.g. ``"7 (hidden_states[8])"``."""
        return [layer_label(i, self.layer_names) for i in self.layers]

    @property
    def stored_names(self) -> list[str]:
        """The model's name of each stored layer, in store order: what index ``j`` of a
        selection made on this store's features is (``"hidden_states[4]"``, or
        ``"model layer 3"`` when the model's names are unknown)."""
        return [
            self.layer_names[i] if self.layer_names else f"model layer {i}" for i in self.layers
        ]

    def _positions(self, layers: Sequence[int] | None) -> list[int]:
        if layers is None:
            return list(range(len(self.layers)))
        out = []
        for i in layers:
            if i not in self.layers:
                raise LOESError(
                    f"layer {i} is not in the store {self.path} (it holds layers {self.layers})"
                )
            out.append(self.layers.index(i))
        return out

    def _read(self, shard: dict[str, Any], positions: list[int]) -> tuple:
        """One shard's features of the given stored-layer positions, targets and row numbers."""
        safe_open = require("safetensors", extra="hf").safe_open
        with safe_open(str(self.path / shard["file"]), framework="pt") as f:
            feats = [f.get_tensor(_layer_key(j)).float() for j in positions]
            return feats, _shard_targets(f), f.get_tensor("indices").numpy()

    def batches(
        self,
        batch_size: int = 1024,
        *,
        layers: Sequence[int] | None = None,
        shuffle: bool = False,
        random_state: RandomState = None,
        with_indices: bool = False,
    ) -> Iterator[tuple]:
        """Yield ``(x, y)`` batches read lazily from the shards.

        ``x`` is a float32 tensor of shape ``(n, k, D)`` (a list of ``(n, D_l)``
        tensors when the widths differ); ``y`` the batch's targets (None if the
        store has none). ``shuffle=True`` visits the shards in a random order
        and shuffles rows within each shard (memory stays one shard). With
        ``with_indices=True`` the global row numbers come third.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise LOESError(f"batch_size must be a positive int; got {batch_size!r}")
        positions = self._positions(layers)
        same = len({self.widths[p] for p in positions}) == 1
        rng = check_random_state(random_state) if shuffle else None
        order = rng.permutation(len(self._shards)) if rng is not None else range(len(self._shards))
        pending: list[tuple] = []  # (features, targets, indices) pieces not yet yielded
        held = 0
        for s in order:
            shard = self._shards[s]
            feats, targets, indices = self._read(shard, positions)
            if rng is not None:
                perm = torch.as_tensor(rng.permutation(shard["rows"]))
                feats = [f[perm] for f in feats]
                targets = None if targets is None else targets[perm.numpy()]
                indices = indices[perm.numpy()]
            pending.append((feats, targets, indices))
            held += shard["rows"]
            while held >= batch_size:
                piece, pending = _take(pending, batch_size)
                held -= batch_size
                yield _as_batch(piece, same, with_indices)
        if held:
            piece, _ = _take(pending, held)
            yield _as_batch(piece, same, with_indices)

    def load(self, layers: Sequence[int] | None = None) -> tuple[Any, np.ndarray | None]:
        """All rows in memory: ``(x, y)`` with ``x`` of shape ``(N, k, D)`` (or a list)."""
        xs: list[list[torch.Tensor]] = []
        ys: list[Any] = []
        for x, y in self.batches(max(s["rows"] for s in self._shards), layers=layers):
            xs.append(list(x.unbind(1)) if torch.is_tensor(x) else x)
            ys.append(y)
        parts = [torch.cat([b[j] for b in xs]) for j in range(len(xs[0]))]
        same = len({p.shape[1] for p in parts}) == 1
        x_all = torch.stack(parts, dim=1) if same else parts
        y_all = None if ys[0] is None else np.concatenate(ys)
        return x_all, y_all


def _shard_targets(f: Any) -> np.ndarray | None:
    """An open shard's targets: the ``targets`` tensor, or non-numeric labels from its metadata."""
    if "targets" in set(f.keys()):
        return f.get_tensor("targets").numpy()
    meta = f.metadata() or {}
    return np.asarray(json.loads(meta["targets"])) if "targets" in meta else None


def _take(pieces: list[tuple], n: int) -> tuple[tuple, list[tuple]]:
    """The first ``n`` rows of a list of (features, targets, indices) pieces, and the rest."""
    out: list[tuple] = []
    rest = list(pieces)
    while n:
        feats, targets, indices = rest.pop(0)
        m = min(n, len(indices))
        out.append(([f[:m] for f in feats], None if targets is None else targets[:m], indices[:m]))
        if m < len(indices):
            rest.insert(
                0, ([f[m:] for f in feats], None if targets is None else targets[m:], indices[m:])
            )
        n -= m
    feats = [torch.cat([o[0][j] for o in out]) for j in range(len(out[0][0]))]
    targets = None if out[0][1] is None else np.concatenate([o[1] for o in out])
    return (feats, targets, np.concatenate([o[2] for o in out])), rest


def _as_batch(piece: tuple, same: bool, with_indices: bool) -> tuple:
    feats, targets, indices = piece
    x = torch.stack(feats, dim=1) if same else feats
    return (x, targets, indices) if with_indices else (x, targets)


def load_features(path: Any) -> FeatureStore:
    """Open a feature store folder written by :class:`FeatureWriter` (lazily, memory-mapped).

    Raises
    ------
    LOESError
        The folder is missing, unfinished (no manifest), of another format
        version, or a listed shard is missing.
    """
    path = Path(path)
    if not path.exists():
        raise LOESError(f"feature store not found: {path}; check the path")
    if not path.is_dir():
        raise LOESError(f"{path} is a file; a feature store is a folder with a {MANIFEST}")
    return FeatureStore(path)
