"""Input checking: one checker for embeddings, one for targets, one for k.

Messages say what was expected, what arrived and how to fix it.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from loes._exceptions import LOESError, LOESWarning
from loes._progress import find_stacklevel

__all__ = [
    "IGNORE_INDEX",
    "Targets",
    "check_embeddings",
    "check_k",
    "check_targets",
    "normalize_task",
]

#: Label value that marks "no label" (PyTorch's cross-entropy ignore_index).
IGNORE_INDEX = -100

_TASK_ALIASES = {
    "classification": "classification",
    "classify": "classification",
    "regression": "regression",
    "label_free": "label_free",
    "label-free": "label_free",
    "unsupervised": "label_free",
}


def normalize_task(task: str) -> str:
    """Map task aliases to ``"classification"``, ``"regression"`` or ``"label_free"``."""
    key = str(task).lower() if task is not None else ""
    if key not in _TASK_ALIASES:
        raise LOESError(
            f"task must be 'classification', 'regression' or 'label_free'; got {task!r}"
        )
    return _TASK_ALIASES[key]


def _as_tensor(x: Any, what: str) -> torch.Tensor:
    """A real, dense, detached tensor (no copy for tensors and contiguous arrays)."""
    if isinstance(x, torch.Tensor):
        if x.layout != torch.strided:
            raise LOESError(
                f"{what} is a sparse tensor ({x.layout}); pass a dense one: x.to_dense()"
            )
        if x.device.type == "meta":
            raise LOESError(
                f"{what} is on the meta device (a shape without values): materialise it first"
            )
        if x.is_complex():
            raise LOESError(
                f"{what} is complex ({x.dtype}); pass real features, e.g. x.real or x.abs()"
            )
        return x.detach()  # a view without the autograd graph: no gradient memory
    if isinstance(x, np.ma.MaskedArray):
        masked = int(np.ma.getmaskarray(x).sum())
        if masked:
            raise LOESError(
                f"{what} is a masked array with {masked} masked entries: drop those samples or fill "
                "them (x.filled(value)) first"
            )
        x = x.data
    try:
        arr = np.asarray(x)
    except Exception as e:  # pragma: no cover - exotic inputs
        raise LOESError(
            f"{what} must be a torch tensor or numpy array; got {type(x).__name__}"
        ) from e
    if arr.dtype == object:
        raise LOESError(
            f"{what} must be numeric; got an object array (ragged lists?) of shape {arr.shape}"
        )
    if np.iscomplexobj(arr):
        raise LOESError(
            f"{what} is complex ({arr.dtype}); pass real features, e.g. x.real or np.abs(x)"
        )
    if not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
        raise LOESError(f"{what} must be numeric; got dtype {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _is_array(item: Any) -> bool:
    """An array-like item of a sequence (numpy, torch, anything with ``__array__``), not a number."""
    return isinstance(item, (np.ndarray, torch.Tensor)) or (
        hasattr(item, "__array__") and not isinstance(item, np.generic)
    )


def check_embeddings(embeddings: Any, *, check_finite: bool = True) -> list[torch.Tensor]:
    """Validate calibration embeddings and return one (N, D_l) view per layer.

    Parameters
    ----------
    embeddings : array or tensor of shape (n_samples, n_layers, dim), or a
        sequence of n_layers arrays of shape (n_samples, dim_l)
        Any real float dtype (fp16/bf16 included) and device. Integer input is
        cast to float32. A list or tuple whose items are arrays or tensors is a
        list of layers; a nested list of numbers is read with ``np.asarray`` and
        must be 3-D, (n_samples, n_layers, dim). Tensors are detached (no
        autograd graph); sparse, meta-device, complex and partly masked inputs
        are errors.

    Returns
    -------
    list of torch.Tensor
        Views of each layer (no copy for tensors), on the input's device.
    """
    if isinstance(embeddings, (list, tuple)) and embeddings and not any(map(_is_array, embeddings)):
        embeddings = _as_tensor(
            embeddings, "embeddings (a nested list, read as (n_samples, n_layers, dim))"
        )
    if isinstance(embeddings, (list, tuple)):
        if len(embeddings) == 0:
            raise LOESError("embeddings is an empty sequence: pass at least one layer")
        if not all(map(_is_array, embeddings)):
            raise LOESError(
                "embeddings mixes arrays and nested lists: pass a list of (n_samples, dim_l) arrays "
                "(one per layer) or one (n_samples, n_layers, dim) array"
            )
        layers = [_as_tensor(e, f"embeddings[{i}]") for i, e in enumerate(embeddings)]
        for i, layer in enumerate(layers):
            if layer.ndim != 2:
                raise LOESError(
                    "a sequence of layers must hold arrays of shape (n_samples, dim_l); "
                    f"layer {i} has shape {tuple(layer.shape)}"
                    + (": flatten or pool spatial axes first" if layer.ndim > 2 else "")
                )
        n = layers[0].shape[0]
        bad = [i for i, layer in enumerate(layers) if layer.shape[0] != n]
        if bad:
            raise LOESError(
                f"all layers must have the same number of samples; layer 0 has {n}, "
                f"layer {bad[0]} has {layers[bad[0]].shape[0]}"
            )
        devices = {layer.device for layer in layers}
        if len(devices) > 1:
            raise LOESError(f"all layers must be on one device; got {sorted(map(str, devices))}")
    else:
        x = _as_tensor(embeddings, "embeddings")
        if x.ndim != 3:
            hint = ""
            if x.ndim == 2:
                hint = ": for a single layer use X[:, None, :]"
            elif x.ndim == 4:
                hint = (
                    ": pool spatial or token axes first, or pass a list of (n_samples, dim) layers"
                )
            raise LOESError(
                "embeddings must have shape (n_samples, n_layers, dim); "
                f"got {x.ndim}-D array of shape {tuple(x.shape)}{hint}"
            )
        layers = [x[:, i, :] for i in range(x.shape[1])]
        n = x.shape[0]
        if x.shape[1] == 0:
            raise LOESError(f"embeddings have no layers: shape {tuple(x.shape)}")
    if n == 0:
        raise LOESError("embeddings have no samples (n_samples = 0)")
    for i, layer in enumerate(layers):
        if layer.shape[1] == 0:
            raise LOESError(f"layer {i} has dimension 0")
        if not (layer.is_floating_point()):
            layers[i] = layer.float()
        elif check_finite and not bool(torch.isfinite(layer.sum(dtype=torch.float64))):
            # one pass without a temporary; a finite float64 sum means every entry is finite
            count = int((~torch.isfinite(layer)).sum())
            if count:
                raise LOESError(
                    f"embeddings contain {count} NaN/Inf values in layer {i}: "
                    "drop or fix those samples (fp16 overflow? extract in fp32 or bf16)"
                )
            lo, hi = torch.aminmax(layer)
            raise LOESError(
                f"embeddings of layer {i} are finite but as large as {max(-float(lo), float(hi)):.3g}: "
                "their sum overflows float64; rescale that layer (selection does not depend on a "
                "layer's scale)"
            )
    if n < 3:
        raise LOESError(f"LOES needs at least 3 calibration samples; got {n}")
    return layers


def check_k(k: int | None, n_layers: int | None = None, *, allow_none: bool = False) -> int | None:
    """Check the layer budget: an integer with 1 <= k <= n_layers.

    With ``n_layers=None`` (before the data are read) only ``k >= 1`` is checked.
    """
    if k is None:
        if allow_none:
            return None
        raise LOESError("k (the number of layers to select) must be given")
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise LOESError(f"k must be an integer; got {type(k).__name__} {k!r}")
    if n_layers is None:
        if int(k) < 1:
            raise LOESError(f"k must be between 1 and the number of layers; got {k}")
    elif not 1 <= int(k) <= n_layers:
        raise LOESError(f"k must be between 1 and the number of layers ({n_layers}); got {k}")
    return int(k)


@dataclass
class Targets:
    """Validated targets.

    Attributes
    ----------
    y : torch.Tensor of shape (n_kept, m), float64
        One-hot / soft labels (classification) or the regression targets.
    labels : torch.Tensor of shape (n_kept,) or None
        Integer class ids 0..C-1 when hard labels are known (class-geometry term).
    classes : list or None
        Original label value of each class id.
    keep : torch.Tensor of shape (n_samples,), bool, or None
        Which samples survive (None: all). Samples with the ignore index are dropped.
    """

    y: torch.Tensor
    labels: torch.Tensor | None
    classes: list | None
    keep: torch.Tensor | None


def check_targets(
    targets: Any,
    task: str,
    n_samples: int,
    *,
    ignore_index: int | None = IGNORE_INDEX,
) -> Targets:
    """Validate targets for ``task`` and encode them as a float matrix.

    Classification accepts labels of any hashable values (ints, strings, ...),
    a one-hot matrix or a soft-label matrix of shape (n_samples, n_classes)
    (non-negative rows summing to 1 within 1e-6). Regression accepts
    (n_samples,) or (n_samples, m) real numbers. Complex and partly masked
    targets are errors.
    """
    task = normalize_task(task)
    if task == "label_free":
        raise LOESError("label_free selection takes no targets")
    if targets is None:
        raise LOESError(
            f"targets are required for task={task!r}; pass labels or use task='label_free'"
        )
    if isinstance(targets, torch.Tensor):
        arr = _as_tensor(targets, "targets").cpu()
        arr = arr.float().numpy() if arr.dtype in (torch.float16, torch.bfloat16) else arr.numpy()
    else:
        if isinstance(targets, np.ma.MaskedArray):
            targets = _as_tensor(targets, "targets").numpy()  # an error if any entry is masked
        arr = np.asarray(targets)
        if np.iscomplexobj(arr):
            raise LOESError(f"targets are complex ({arr.dtype}); pass real labels or values")
    if arr.ndim == 0 or arr.shape[0] != n_samples:
        raise LOESError(
            f"targets must have one row per sample ({n_samples}); got shape {arr.shape}"
        )
    if arr.ndim > 2:
        raise LOESError(f"targets must be 1-D or 2-D; got shape {arr.shape}")

    if task == "regression":
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_
        ):
            raise LOESError(
                f"regression targets must be numeric; got dtype {arr.dtype} "
                "(use task='classification' for categorical labels)"
            )
        y = torch.from_numpy(np.asarray(arr, dtype=np.float64).reshape(n_samples, -1))
        if not bool(torch.isfinite(y).all()):
            raise LOESError("regression targets contain NaN/Inf: drop those samples first")
        return Targets(y=y, labels=None, classes=None, keep=None)

    # classification
    if arr.ndim == 2:
        if not np.issubdtype(arr.dtype, np.number):
            raise LOESError(
                f"2-D classification targets must be numeric one-hot/soft labels; got {arr.dtype}"
            )
        y = torch.from_numpy(np.asarray(arr, dtype=np.float64))
        if not bool(torch.isfinite(y).all()):
            raise LOESError("classification targets contain NaN/Inf")
        if y.shape[1] < 2:
            raise LOESError(
                f"one-hot/soft targets need at least 2 columns (classes); got shape {tuple(y.shape)}"
            )
        hard = bool(((y == 0) | (y == 1)).all()) and bool((y.sum(1) == 1).all())
        if not hard:
            worst = float((y.sum(1) - 1).abs().max())
            if bool((y < 0).any()) or worst > 1e-6:
                raise LOESError(
                    "2-D classification targets must be one-hot or soft labels (non-negative rows "
                    f"summing to 1); got min {float(y.min()):.3g} and a row sum off by {worst:.3g}: "
                    "normalise the rows (e.g. a softmax), or pass task='regression' for real values"
                )
        labels = y.argmax(1) if hard else None
        if hard:
            present = torch.unique(labels)
            if present.numel() < 2:
                raise LOESError(
                    "classification needs at least 2 classes; all samples have one class"
                )
            _warn_small_classes(labels)
        return Targets(y=y, labels=labels, classes=list(range(y.shape[1])), keep=None)

    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise LOESError("classification labels contain NaN/Inf")
        if not np.all(arr == np.round(arr)):
            raise LOESError(
                "classification labels are non-integer floats; for regression pass task='regression', "
                "for soft labels pass a (n_samples, n_classes) matrix"
            )
        arr = arr.astype(np.int64)
    keep = None
    if ignore_index is not None and arr.dtype.kind in "iu":
        mask = arr == ignore_index
        if mask.any():
            warnings.warn(
                f"dropping {int(mask.sum())} samples labelled {ignore_index} (ignore index)",
                LOESWarning,
                stacklevel=find_stacklevel(),
            )
            keep = torch.from_numpy(~mask)
            arr = arr[~mask]
    try:
        classes, labels = np.unique(arr, return_inverse=True)
    except TypeError as e:
        raise LOESError(f"classification labels must be comparable values; {e}") from e
    if len(classes) < 2:
        raise LOESError(
            f"classification needs at least 2 classes; every sample has label {classes[0]!r}"
            if len(classes) == 1
            else "no labelled samples left"
        )
    labels_t = torch.from_numpy(labels.reshape(-1).astype(np.int64))
    y = torch.nn.functional.one_hot(labels_t, len(classes)).double()
    _warn_small_classes(labels_t)
    return Targets(
        y=y,
        labels=labels_t,
        classes=[c.item() if hasattr(c, "item") else c for c in classes],
        keep=keep,
    )


def _warn_small_classes(labels: torch.Tensor) -> None:
    counts = torch.bincount(labels)
    singles = torch.nonzero(counts == 1).flatten().tolist()
    if singles:
        warnings.warn(
            f"{len(singles)} class(es) have a single sample (class ids {singles[:10]}): "
            "their geometry and out-of-sample fit are unreliable; add calibration samples",
            LOESWarning,
            stacklevel=find_stacklevel(),
        )


def as_layer_list(x: Sequence[Any] | Any) -> list[torch.Tensor]:
    """Like :func:`check_embeddings` but without the finiteness scan (for transform)."""
    return check_embeddings(x, check_finite=False)


def closest(
    name: str, candidates: Iterable[str], aliases: Mapping[str, str] | None = None
) -> str | None:
    """The candidate closest to a misspelt ``name`` (an alias gives its target), or None.

    The one "did you mean" of loes (options, keywords, metric names).

    >>> closest("orht_reg", ["orth_reg", "reg"])
    'orth_reg'
    """
    aliases = dict(aliases or {})
    close = difflib.get_close_matches(name, sorted(set(candidates) | set(aliases)), n=1)
    return aliases.get(close[0], close[0]) if close else None
