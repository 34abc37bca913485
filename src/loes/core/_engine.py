"""What both engines share: their options, their output and the score total.

Each preset declares its options once, as a frozen dataclass whose defaults
are the preset's defaults (:data:`DEFAULTS` is derived from them) and whose
construction validates every value, so a typo, an infinite weight or a
string where a bool belongs fails in microseconds, before any data is read.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from loes._exceptions import LOESError
from loes._validation import closest
from loes.result import StepTable

__all__ = [
    "DEFAULTS",
    "EngineOutput",
    "ReferenceOptions",
    "RobustOptions",
    "check_finite_output",
    "compute_dtype",
    "make_options",
    "score_total",
    "seed_is_given",
]

#: Largest CKA working set (n_layers × rows² values) accepted without sampling rows.
CKA_MEMORY_LIMIT = 2 * 1024**3


def score_total(
    fit: float,
    iso_penalty: float,
    redundancy: float,
    geometry: float,
    alpha: float,
    gamma: float,
    eta: float,
) -> float:
    """The LOES score of one candidate (lower is better), for both presets:
    ``fit + alpha·(1 − iso) + gamma·redundancy − eta·geometry``."""
    return fit + alpha * iso_penalty + gamma * redundancy - eta * geometry


def seed_is_given(random_state: Any) -> bool:
    """True when ``random_state`` is an int seed (recorded as such in a result's config)."""
    return isinstance(random_state, (numbers.Integral, np.integer)) and not isinstance(
        random_state, (bool, np.bool_)
    )


def compute_dtype(layers: list[torch.Tensor]) -> torch.dtype:
    """float64 for float64 input, else float32 (fp16/bf16 are upcast)."""
    return torch.float64 if layers[0].dtype == torch.float64 else torch.float32


@dataclass
class EngineOutput:
    """What an engine returns to :func:`loes.select_layers_from_custom_embeddings`.

    Attributes
    ----------
    selected : list of int, pick order.
    scores : list of float, each pick's total at pick time.
    steps : list of StepTable, every candidate's terms at each step.
    excluded : list of int, constant layers that could not be selected.
    timings : dict of str to float, seconds per phase.
    config : dict, engine facts recorded in the result (forms used, ranks, ...).
    """

    selected: list[int]
    scores: list[float]
    steps: list[StepTable]
    excluded: list[int]
    timings: dict[str, float]
    config: dict[str, Any]


def check_finite_output(out: EngineOutput, preset: str) -> None:
    """Raise :class:`LOESError` if any score or term is NaN/inf: none may reach a result."""
    for table in out.steps:
        for name, values in table.terms.items():
            bad = [c for c, v in zip(table.candidates, values) if not math.isfinite(v)]
            if bad:
                raise LOESError(
                    f"the {preset} preset produced a non-finite {name!r} term at step {table.step} "
                    f"for layer(s) {bad}: the features of those layers are too large or too small "
                    "for the arithmetic; rescale them (or pass float64) and run again"
                )


# -------------------------------------------------------------------- options
def _number(name: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise LOESError(f"{name} must be a number; got {type(value).__name__} {value!r}")
    value = float(value)
    ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        rule = "a positive" if positive else "a non-negative"
        raise LOESError(f"{name} must be {rule} finite number; got {value!r}")
    return value


def _integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise LOESError(
            f"{name} must be an integer >= {minimum}; got {type(value).__name__} {value!r}"
        )
    if int(value) < minimum:
        raise LOESError(f"{name} must be an integer >= {minimum}; got {int(value)}")
    return int(value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise LOESError(f"{name} must be True or False; got {type(value).__name__} {value!r}")
    return bool(value)


class _Options:
    """Validation shared by the presets' option classes (weights and ridge)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            object.__setattr__(self, f.name, f.metadata["check"](f.name, value))


def _weight(default: float) -> Any:
    return field(default=default, metadata={"check": lambda n, v: _number(n, v, positive=False)})


def _positive(default: float) -> Any:
    return field(default=default, metadata={"check": lambda n, v: _number(n, v, positive=True)})


def _cv(name: str, value: Any) -> str:
    if value not in ("gcv", "loo"):
        raise LOESError(f"cv must be 'loo' (exact leave-one-out) or 'gcv'; got {value!r}")
    return str(value)


def _cka_samples(name: str, value: Any) -> int | None:
    if value is None:
        return None
    try:
        return _integer(name, value, 4)
    except LOESError as e:
        raise LOESError(f"{e} (the rows used for CKA), or None for all rows") from None


@dataclass(frozen=True)
class ReferenceOptions(_Options):
    """Options of ``preset="reference"``: the published hyper-parameters.

    reg : ridge strength (absolute), > 0. alpha, gamma, eta : weights of the
    isotropy, redundancy and class-geometry terms, >= 0.
    """

    reg: float = _positive(1e-3)
    alpha: float = _weight(1.0)
    gamma: float = _weight(0.5)
    eta: float = _weight(0.1)


@dataclass(frozen=True)
class RobustOptions(_Options):
    """Options of ``preset="robust"``; defaults chosen on the benchmark suite (docs/core.md).

    reg : relative ridge strength (× the layer's mean eigenvalue), > 0.
    alpha, gamma, eta : weights of the isotropy, redundancy and geometry terms, >= 0.
    orth_reg : relative ridge of the orthogonalisation, > 0.
    orth_rank : directions kept per selected layer, >= 1.
    cka_samples : rows sampled for CKA (>= 4), or None for all rows.
    cka_debiased : unbiased HSIC estimator for CKA.
    standardize : unit variance per feature.
    cv : "gcv" (generalised cross-validation) or "loo" (exact leave-one-out).
    """

    reg: float = _positive(1.0)
    alpha: float = _weight(0.1)
    gamma: float = _weight(0.1)
    eta: float = _weight(0.05)
    orth_reg: float = _positive(1.0)
    orth_rank: int = field(default=64, metadata={"check": lambda n, v: _integer(n, v, 1)})
    cka_samples: int | None = field(default=512, metadata={"check": _cka_samples})
    cka_debiased: bool = field(default=True, metadata={"check": _flag})
    standardize: bool = field(default=True, metadata={"check": _flag})
    cv: str = field(default="gcv", metadata={"check": _cv})

    def check_cka_memory(self, n: int, n_layers: int, itemsize: int) -> None:
        """Refuse a CKA working set of n_layers × rows² values above ~2 GB."""
        rows = n if self.cka_samples is None else min(n, self.cka_samples)
        need = n_layers * rows * rows * itemsize
        if need > CKA_MEMORY_LIMIT:
            raise LOESError(
                f"CKA on {rows} rows of {n_layers} layers needs {need / 1024**3:.1f} GB "
                f"(n_layers × rows² values); pass cka_samples=512 (or another int) to sample rows"
            )


PresetOptions = ReferenceOptions | RobustOptions

#: The option class of each preset.
PRESETS: dict[str, type[_Options]] = {"reference": ReferenceOptions, "robust": RobustOptions}

#: Default options of each preset, derived from the option classes.
DEFAULTS: dict[str, dict[str, Any]] = {name: asdict(cls()) for name, cls in PRESETS.items()}


def make_options(preset: str, **given: Any) -> PresetOptions:
    """The validated options of ``preset`` from keyword arguments (absent = the default).

    ``beta`` is accepted for ``gamma`` (the paper's name). Unknown names raise a
    :class:`LOESError` with a "did you mean" hint.
    """
    if preset not in PRESETS:
        raise LOESError(f"preset must be one of {sorted(PRESETS)}; got {preset!r}")
    if "beta" in given:
        if "gamma" in given:
            raise LOESError("pass either 'beta' or 'gamma' (the same weight), not both")
        given["gamma"] = given.pop("beta")
    cls = PRESETS[preset]
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(given) - set(known))
    if unknown:
        hints = [
            f"{name!r}: did you mean {close!r}?"
            for name in unknown
            for close in [closest(name, known + ["beta"])]
            if close
        ]
        raise LOESError(
            f"unknown option(s) {unknown} for preset={preset!r}; "
            + ("; ".join(hints) + "; " if hints else "")
            + f"its options are {sorted(known)}"
        )
    return cls(**given)
