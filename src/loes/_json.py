"""The one JSON policy of loes.

Output is strict JSON that any parser reads: a non-finite number (NaN, ±inf)
is written as ``null``, never as a bare ``NaN`` token or a string; numpy and
torch scalars and arrays become numbers and lists; paths and other objects
become their ``str``. Readers turn ``null`` back into NaN where a number is
expected (:func:`float_or_nan`).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import torch

__all__ = ["dumps", "float_or_nan", "to_jsonable"]


def to_jsonable(value: Any) -> Any:
    """``value`` as plain JSON types, non-finite floats as ``None``.

    >>> to_jsonable({"a": float("nan"), "b": np.float32(0.5), 3: (1, np.int64(2))})
    {'a': None, 'b': 0.5, '3': [1, 2]}
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`to_jsonable` (``allow_nan=False``: strict JSON)."""
    return json.dumps(to_jsonable(value), allow_nan=False, **kwargs)


def float_or_nan(value: Any | None) -> float:
    """A number read back from JSON: ``None`` (a non-finite value written out) is NaN.

    >>> float_or_nan(None), float_or_nan(0.25)
    (nan, 0.25)
    """
    return math.nan if value is None else float(value)
