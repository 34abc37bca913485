"""Extraction settings and the checks that run before any model or data is loaded.

:class:`ExtractionConfig` holds how features are extracted (pooling, batching,
truncation, device, precision, caching); it validates itself when built, so a
bad value fails in microseconds, not after a model load. :func:`check_keywords`
gives the HF entry points a "did you mean" error for a misspelt keyword.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from loes._exceptions import LOESError
from loes._rng import check_random_state, seed_of
from loes._validation import closest
from loes.hf import _models as M
from loes.hf.cache import resolve_cache_dir, resolve_max_bytes
from loes.hf.capture import check_layer_spec
from loes.hf.pooling import POOLINGS
from loes.hf.sampling import DEFAULT_MAX_SAMPLES

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "ExtractionConfig",
    "check_keywords",
    "sampling_random_state",
    "split_random_state",
]

#: Token budget when ``max_length`` is not given (capped at the model's positions).
DEFAULT_MAX_LENGTH = 512


def _positive_int(name: str, value: Any, minimum: int = 1, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, (int, np.integer))
        or value < minimum
    ):
        raise LOESError(
            f"{name} must be an integer >= {minimum}{' or None' if allow_none else ''}; got {value!r}"
        )


@dataclass(frozen=True)
class ExtractionConfig:
    """How features are extracted; checked when built.

    Attributes
    ----------
    pooling : {"auto", "cls", "mean", "masked_mean", "max", "last_token"}
    batch_size : int >= 1
    max_length : int >= 2, optional
        Token budget per text; ``None``: 512 capped at the model's position count.
        A value beyond the model's positions is an error.
    max_samples : int >= 1, optional
        Calibration sample cap (``None``: every row).
    device : str or torch.device, optional
        ``None``/"auto": CUDA if available, else CPU.
    dtype : {"auto", "float32", "float16", "bfloat16"} or torch.dtype, optional
    include_embeddings : bool
        Keep the embedding output as layer 0.
    cache_dir : str, path or bool, optional
        Embedding cache folder (``True``: the default folder).
    cache_key : str, optional
        Names a dataloader's content for the cache.
    cache_max_bytes : int, optional
        Size cap of the cache folder (default ``$LOES_CACHE_MAX_BYTES`` or none);
        least recently used entries are evicted.
    num_workers : int >= 0
    layers : layer spec, optional
        Keep only these layers (``None``: every layer): an int (negative counts from
        the end), a list of ints, ``"1,4,-1"``, ``"first"``, ``"middle"``, ``"last"``,
        ``"all"`` or ``"sweep:..."`` (:func:`loes.layers.resolve_layers`, in the
        convention of ``include_embeddings``). They are captured by hooks on the
        model's blocks and the forward pass stops after the deepest one; the
        result holds them in increasing order.
    sort_by_length : bool
        Batch text rows of similar length together (longest first) to cut padding;
        results come back in the calibration order either way.
    device_map : str or dict, optional
        Passed to ``from_pretrained`` (accelerate): ``"auto"`` spreads a model that
        does not fit one device over the GPUs, the CPU and ``offload_folder``.
        Only for models loaded by id; exclusive with ``device``.
    max_memory : dict, optional
        Memory cap per device for ``device_map``, e.g. ``{0: "20GiB", "cpu": "60GiB"}``.
    offload_folder : str or path, optional
        Where ``device_map`` puts the weights that fit nowhere else.
    quantization_config : optional
        Passed to ``from_pretrained`` (e.g. ``transformers.BitsAndBytesConfig``;
        needs its package). GGUF checkpoints: ``gguf_file=``.
    """

    pooling: str = "auto"
    batch_size: int = 32
    max_length: int | None = None
    max_samples: int | None = DEFAULT_MAX_SAMPLES
    device: Any = None
    dtype: Any = None
    include_embeddings: bool = False
    cache_dir: None | bool | str | os.PathLike = None
    cache_key: str | None = None
    cache_max_bytes: int | None = None
    num_workers: int = 0
    layers: Any = None
    sort_by_length: bool = True
    device_map: None | str | Mapping[str, Any] = None
    max_memory: Mapping[Any, Any] | None = None
    offload_folder: None | str | os.PathLike = None
    quantization_config: Any = None

    def __post_init__(self) -> None:
        name = str(self.pooling).lower() if isinstance(self.pooling, str) else None
        if name not in (*POOLINGS, "auto", "avg", "average"):
            raise LOESError(
                f"pooling must be 'auto' or one of {list(POOLINGS)}; got {self.pooling!r}"
            )
        _positive_int("batch_size", self.batch_size)
        _positive_int("max_length", self.max_length, 2, allow_none=True)
        _positive_int("max_calibration_samples (max_samples)", self.max_samples, allow_none=True)
        _positive_int("num_workers", self.num_workers, 0)
        if not isinstance(self.include_embeddings, (bool, np.bool_)):
            raise LOESError(
                f"include_embeddings must be True or False; got {self.include_embeddings!r}"
            )
        device = check_device(self.device)
        if self.dtype is not None:
            M.parse_dtype(self.dtype, device)
        resolve_cache_dir(self.cache_dir)
        if self.cache_key is not None and not isinstance(self.cache_key, str):
            raise LOESError(f"cache_key must be a string; got {type(self.cache_key).__name__}")
        if self.cache_max_bytes is not None:
            resolve_max_bytes(self.cache_max_bytes)
        if self.layers is not None:
            check_layer_spec(self.layers)
        if not isinstance(self.sort_by_length, (bool, np.bool_)):
            raise LOESError(f"sort_by_length must be True or False; got {self.sort_by_length!r}")
        self._check_placement()

    def _check_placement(self) -> None:
        if self.device_map is not None and not isinstance(self.device_map, (str, Mapping)):
            raise LOESError(
                f"device_map must be 'auto', 'balanced', 'sequential', a device name or a dict "
                f"of module name to device; got {type(self.device_map).__name__}"
            )
        if self.device_map is not None and self.device is not None:
            raise LOESError(
                "pass either device=... or device_map=..., not both (device_map places the "
                "model's parts itself)"
            )
        if self.max_memory is not None and not isinstance(self.max_memory, Mapping):
            raise LOESError(
                f"max_memory must be a dict of device to size, e.g. {{0: '20GiB', 'cpu': "
                f"'60GiB'}}; got {type(self.max_memory).__name__}"
            )
        for name in ("max_memory", "offload_folder"):
            if getattr(self, name) is not None and self.device_map is None:
                raise LOESError(f"{name}=... needs device_map=... (e.g. device_map='auto')")

    @classmethod
    def from_keywords(cls, config: ExtractionConfig | None, **keywords: Any) -> ExtractionConfig:
        """``config``, or one built from an entry point's keywords; both at once is an error
        unless every keyword is at its default."""
        if config is None:
            return cls(**keywords)
        if not isinstance(config, cls):
            raise LOESError(f"config must be a loes.ExtractionConfig; got {type(config).__name__}")
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        clash = sorted(k for k, v in keywords.items() if not _same(v, defaults[k]))
        if clash:
            raise LOESError(
                f"pass the extraction settings either as config=ExtractionConfig(...) or as keywords, "
                f"not both: got config and {clash}; use dataclasses.replace(config, ...) to change one"
            )
        return config

    def resolved_max_length(self, limit: int | None) -> int:
        """``max_length`` checked against the model's position count ``limit`` (None: unknown)."""
        if self.max_length is None:
            return DEFAULT_MAX_LENGTH if limit is None else min(DEFAULT_MAX_LENGTH, limit)
        if limit is not None and self.max_length > limit:
            raise LOESError(
                f"max_length={self.max_length} exceeds the model's {limit} positions "
                f"(config.max_position_embeddings): pass max_length<={limit}"
            )
        return int(self.max_length)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # array-like values compare element-wise
        return a is b


def check_device(device: Any) -> torch.device:
    """A torch device for ``device`` (None/"auto": CUDA if available), checked to exist."""
    try:
        dev = M.default_device(device)
    except (RuntimeError, TypeError) as e:
        raise LOESError(
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:N', 'mps' or a torch.device; "
            f"got {device!r}"
        ) from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LOESError(
            f"device={device!r} but CUDA is not available here: use device='cpu' or 'auto'"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LOESError(
            f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
        )
    return dev


def _is_seed(random_state: Any) -> bool:
    return isinstance(random_state, (int, np.integer)) and not isinstance(
        random_state, (bool, np.bool_)
    )


def sampling_random_state(random_state: Any) -> int | np.random.Generator:
    """What the calibration draw gets: an int seed as a Python int, anything else as a
    numpy Generator (:func:`loes._rng.check_random_state`)."""
    return seed_of(random_state) if _is_seed(random_state) else check_random_state(random_state)


def split_random_state(random_state: Any) -> tuple[Any, Any]:
    """(for sampling, for the selector): the same semantics on both paths.

    An int seed (Python or numpy) is given to both as a Python int; any other
    kind (``None``, a numpy Generator/RandomState, a torch.Generator) becomes one
    numpy Generator for sampling and an int seed drawn from it for the selector.
    """
    sample = sampling_random_state(random_state)
    return sample, (sample if isinstance(sample, int) else seed_of(sample))


def check_random_state_kind(random_state: Any) -> None:
    """Reject a bad ``random_state`` without advancing a generator passed in."""
    if not isinstance(random_state, (np.random.Generator, np.random.RandomState, torch.Generator)):
        check_random_state(random_state)


def unknown_keywords(
    where: str, given: Iterable[str], known: Iterable[str], aliases: Mapping[str, str] | None = None
) -> None:
    """A :class:`LOESError` naming the first keyword of ``given`` not in ``known``, with a hint."""
    known = set(known)
    bad = [k for k in given if k not in known]
    if bad:
        close = closest(bad[0], known, aliases)
        hint = f"; did you mean {close!r}?" if close else ""
        more = f" (also {bad[1:]})" if len(bad) > 1 else ""
        raise LOESError(f"{where}: unknown keyword {bad[0]!r}{hint}{more}")


def check_keywords(fn: Callable) -> Callable:
    """Decorate a function without ``**kwargs``: an unknown keyword is a :class:`LOESError`
    with a "did you mean" hint instead of Python's bare ``TypeError``."""
    params = inspect.signature(fn).parameters
    known = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        unknown_keywords(fn.__name__, kwargs, known)
        return fn(*args, **kwargs)

    return wrapper
