"""The result of a layer selection: what was picked, why, and how long it took."""

from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Union

from loes._estimate import Estimate
from loes._exceptions import LOESError
from loes._io import load_json_file
from loes._json import dumps, float_or_nan, to_jsonable

__all__ = ["LOESResult", "StepTable"]

#: Score terms in the order they are printed.
TERMS = ("fit", "isotropy", "redundancy", "geometry", "total")


@dataclass
class StepTable:
    """Every candidate's score terms at one greedy step.

    Attributes
    ----------
    step : int
        1-based step number.
    selected : int
        The layer picked at this step.
    candidates : list of int
        Layers scored at this step (those not yet selected and not excluded).
    terms : dict of str to list of float
        ``"fit"``, ``"isotropy"``, ``"redundancy"``, ``"geometry"`` (unweighted
        terms, one value per candidate) and ``"total"`` (the weighted score that
        was minimised). A term that does not apply at this step is all zeros.
    """

    step: int
    selected: int
    candidates: List[int]
    terms: Dict[str, List[float]]

    def row(self, layer: int) -> Dict[str, float]:
        """The terms of one candidate layer at this step."""
        try:
            i = self.candidates.index(layer)
        except ValueError:
            raise KeyError(f"layer {layer} was not a candidate at step {self.step}") from None
        return {name: values[i] for name, values in self.terms.items()}


@dataclass
class LOESResult:
    """What a LOES selection returns.

    The first eight fields are those of the published reference implementation,
    so code written against it keeps working; the rest are additions.

    Attributes
    ----------
    selected_layers : list of int
        Selected layers in pick order (0 = first transformer block unless
        ``layer_names`` says otherwise).
    layer_scores : list of float
        The winning score at each pick (lower is better); NaN where the method
        has no score (the fixed baselines ``last``, ``last_k``, ``all_concat``,
        ``layer_weights``, ``random_k``).
    task : str
        ``"classification"``, ``"regression"`` or ``"label_free"``.
    num_layers_seen : int
        Number of layers that were candidates.
    num_calibration_samples : int
        Number of samples used for selection.
    pooling : str
        How token states were pooled (``"precomputed"`` for custom embeddings).
    dataset, model_name : str, optional
        Provenance, when known.
    preset : str or None
        The LOES preset, ``"robust"`` (default) or ``"reference"``; None when
        another method made the result.
    steps : list of StepTable
        The full score table of every greedy step.
    config : dict
        Every setting that influenced the result (weights, ridge, seeds, ...).
    timings : dict of str to float
        Seconds spent in each phase.
    layer_names : list of str, optional
        Which hidden state each layer index is (e.g. ``"hidden_states[3]"``).
    excluded_layers : list of int
        Layers that could not be selected (constant / zero variance).
    warnings : list of str
        Warnings raised during the run, as text.
    method : str
        What made the result: ``"loes"``, a baseline's name
        (:data:`loes.baselines.BASELINES`) or a label-free metric's name.
    estimate : Estimate, optional
        Cross-validated probe scores of the picked layers, the last layer, the
        last-k and all layers on the calibration rows (:mod:`loes._estimate`);
        ``estimate.verdict()`` is the one-line answer to "is it worth it?".
    """

    selected_layers: List[int]
    layer_scores: List[float]
    task: str
    num_layers_seen: int
    num_calibration_samples: int
    pooling: str
    dataset: Optional[Any] = None
    model_name: Optional[str] = None
    preset: Optional[str] = "robust"
    steps: List[StepTable] = field(default_factory=list)
    config: Dict[str, Any] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)
    layer_names: Optional[List[str]] = None
    excluded_layers: List[int] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    method: str = "loes"
    estimate: Optional[Estimate] = None

    # ------------------------------------------------------------------ tables
    def score_table(self, step: int = 1) -> List[Dict[str, float]]:
        """Rows ``{"layer", "fit", "isotropy", "redundancy", "geometry", "total"}``
        for every candidate of a step (1-based), sorted by total score."""
        if not 1 <= step <= len(self.steps):
            raise IndexError(f"step must be in 1..{len(self.steps)}; got {step}")
        table = self.steps[step - 1]
        rows = []
        for i, layer in enumerate(table.candidates):
            row: Dict[str, float] = {"layer": layer}
            row.update({name: table.terms[name][i] for name in TERMS if name in table.terms})
            rows.append(row)
        return sorted(rows, key=lambda r: r["total"])

    def to_frame(self):
        """All steps as a long pandas DataFrame (one row per step and candidate)."""
        try:
            import pandas as pd
        except ImportError as e:  # pragma: no cover - pandas comes with datasets
            raise ImportError("LOESResult.to_frame requires pandas: pip install pandas") from e
        rows = []
        for table in self.steps:
            for row in self.score_table(table.step):
                rows.append({"step": table.step, "selected": row["layer"] == table.selected, **row})
        return pd.DataFrame(rows)

    def summary(self) -> str:
        """A plain-text report: the picks, then the first step's table."""
        name = lambda i: self.layer_names[i] if self.layer_names else str(i)  # noqa: E731
        lines = [
            f"{self.label()}: selected layers {self.selected_layers} "
            f"from {self.num_layers_seen} layers, N={self.num_calibration_samples}",
        ]
        if self.model_name:
            lines.append(f"model: {self.model_name}  pooling: {self.pooling}")
        lines.append(f"{'pick':>4}  {'layer':>5}  {'name':<18} {'score':>10}")
        for i, (layer, score) in enumerate(zip(self.selected_layers, self.layer_scores), 1):
            lines.append(f"{i:>4}  {layer:>5}  {name(layer):<18} {format_number(score):>10}")
        if self.steps:
            lines.append("")
            lines.append("step 1 scores (lower is better):")
            lines.append(
                f"{'layer':>5}  {'fit':>8} {'isotropy':>9} {'redund.':>8} {'geometry':>9} {'total':>9}"
            )
            for row in sorted(self.score_table(1), key=lambda r: r["layer"]):
                mark = " *" if row["layer"] in self.selected_layers else ""
                f = {name: format_number(row.get(name)) for name in TERMS}
                lines.append(
                    f"{int(row['layer']):>5}  {f['fit']:>8} {f['isotropy']:>9} "
                    f"{f['redundancy']:>8} {f['geometry']:>9} {f['total']:>9}{mark}"
                )
        if self.excluded_layers:
            lines.append(f"excluded (constant) layers: {self.excluded_layers}")
        if self.estimate is not None:
            lines += ["", "estimate: " + self.estimate.verdict(), self.estimate.table()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def label(self) -> str:
        """``"LOES (robust, classification)"`` or ``"last_k (classification)"``."""
        if self.method == "loes":
            return f"LOES ({self.preset}, {self.task})"
        return f"{self.method} ({self.task})"

    # ------------------------------------------------------------ serialising
    def to_dict(self) -> Dict[str, Any]:
        """A strict-JSON dict (:mod:`loes._json`: NaN as None); :meth:`from_dict` inverts it."""
        return to_jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LOESResult":
        """Inverse of :meth:`to_dict`: None scores become NaN again.

        A dict written before results had a ``method`` field still loads: the
        method is ``config["method"]`` (baselines and metrics set it, and their
        ``preset`` then held that name, not a LOES preset), else ``"loes"``.
        """
        d = check_fields(cls, d, "LOES result")
        if "method" not in d:
            method = (d.get("config") or {}).get("method")
            d["method"], d["preset"] = ("loes", d.get("preset", "robust")) if method is None else (method, None)
        d["layer_scores"] = [float_or_nan(v) for v in d["layer_scores"]]
        if d.get("estimate") is not None:
            d["estimate"] = Estimate.from_dict(d["estimate"])
        d["steps"] = [
            StepTable(**{**s, "terms": {k: [float_or_nan(v) for v in vs] for k, vs in s["terms"].items()}})
            for s in d.get("steps", [])
        ]
        return cls(**d)

    def to_json(self, path: Optional[str] = None, **kwargs: Any) -> str:
        """Serialise to strict JSON (NaN as ``null``); also write it to ``path`` when given."""
        kwargs.setdefault("indent", 2)
        text = dumps(self.to_dict(), **kwargs)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: Union[str, os.PathLike]) -> "LOESResult":
        """Inverse of :meth:`to_json`: a JSON string or a path to a JSON file."""
        return cls.from_dict(read_json_object(text_or_path, "LOES result"))


def read_json_object(source: Union[str, os.PathLike], what: str) -> Dict[str, Any]:
    """The JSON object in ``source``: JSON text (starting with ``{`` or ``[``) or a file's path.

    Raises
    ------
    LOESError
        When the file is missing or unreadable, the text is not JSON, or the
        JSON is not an object; ``what`` names what was expected.
    """
    if isinstance(source, str) and source.lstrip()[:1] in ("{", "["):
        where = "the JSON text"
        try:
            value = json.loads(source)
        except json.JSONDecodeError as e:
            raise LOESError(f"{where} is not valid JSON ({e}); expected what to_json writes") from None
    elif isinstance(source, (str, os.PathLike)):
        where = f"{what} file {os.fspath(source)!r}"
        value = load_json_file(source, what)
    else:
        raise LOESError(f"expected JSON text or the path of a JSON file ({what}); got {type(source).__name__}"
                        + ("; for a dict use from_dict" if isinstance(source, Mapping) else ""))
    if not isinstance(value, dict):
        raise LOESError(f"{where} holds a JSON {type(value).__name__}, not a JSON object ({what})")
    return value


def check_fields(cls: type, d: Any, what: str) -> Dict[str, Any]:
    """A copy of ``d`` after checking it has every required field of dataclass ``cls`` and no other.

    Raises
    ------
    LOESError
        Naming the missing and unknown fields.
    """
    if not isinstance(d, Mapping):
        raise LOESError(f"expected a dict ({what}); got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    missing, unknown = sorted(required - set(d)), sorted(set(d) - known)
    if missing or unknown:
        problems = ([f"missing field(s) {missing}"] if missing else []) + (
            [f"unknown field(s) {unknown}"] if unknown else [])
        raise LOESError(f"{what} dict with {'; '.join(problems)}: pass what {cls.__name__}.to_dict "
                        "or to_json wrote")
    return dict(d)


def format_number(value: Optional[float], spec: str = ".4f") -> str:
    """``value`` formatted by ``spec``; ``"—"`` for an absent (None or NaN) number."""
    if value is None or math.isnan(value):
        return "—"
    return format(value, spec)
