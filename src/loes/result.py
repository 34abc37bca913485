"""The result of a layer selection: what was picked, why, and how long it took."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from loes._estimate import Estimate
from loes._exceptions import LOESError
from loes._io import load_json_file
from loes._json import dumps, float_or_nan, to_jsonable
from loes._naming import layer_label

__all__ = ["LOESResult", "ScoreTerm", "StepTable"]


@dataclass(frozen=True)
class ScoreTerm:
    """One term of the total a selection minimised (:meth:`LOESResult.score_terms`).

    Attributes
    ----------
    key : str
        Its key in :attr:`StepTable.terms` (``"isotropy"`` holds the penalty ``1 − isotropy``).
    column : str
        Its key in :meth:`LOESResult.score_table` rows and ``to_frame`` columns.
    label : str
        What a person reads: ``"isotropy penalty"``.
    weight : float or None
        Its weight (``alpha``, ``gamma``, ``eta``); None when the result does not record it.
    sign : {1, -1}
        ``-1`` for a bonus, which is subtracted.
    symbol : str
        The weight's name, shown when its value is unknown.
    """

    key: str
    column: str
    label: str
    weight: float | None
    sign: int = 1
    symbol: str = ""

    @property
    def signed_weight(self) -> float:
        """The factor of the term in the total (NaN when the weight is unknown)."""
        return self.sign * (float("nan") if self.weight is None else self.weight)

    @property
    def weight_text(self) -> str:
        """``"×+0.1"``, ``"×−0.05"``: how the term enters the total."""
        sign = "−" if self.sign < 0 else "+"
        return f"×{sign}{self.symbol if self.weight is None else format(self.weight, 'g')}"


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
        ``"fit"``, ``"isotropy"`` (the penalty ``1 − isotropy``),
        ``"redundancy"``, ``"geometry"`` (unweighted terms, one value per
        candidate) and ``"total"`` (the weighted score that was minimised,
        :meth:`LOESResult.score_formula`). A term that does not apply at this
        step is all zeros. People read them through
        :meth:`LOESResult.score_table`, which names each for what it is.
    """

    step: int
    selected: int
    candidates: list[int]
    terms: dict[str, list[float]]

    def row(self, layer: int) -> dict[str, float]:
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
        last-k and all layers on the calibration rows, or on held-out rows the
        caller passed (``estimate.rows``; :mod:`loes._estimate`);
        ``estimate.verdict()`` is the one-line answer to "is it worth it?".
    """

    selected_layers: list[int]
    layer_scores: list[float]
    task: str
    num_layers_seen: int
    num_calibration_samples: int
    pooling: str
    dataset: Any | None = None
    model_name: str | None = None
    preset: str | None = "robust"
    steps: list[StepTable] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    layer_names: list[str] | None = None
    excluded_layers: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    method: str = "loes"
    estimate: Estimate | None = None

    # ------------------------------------------------------------------ tables
    def score_terms(self) -> list[ScoreTerm]:
        """The terms of the total that was minimised, with their weights and signs.

        LOES (both presets, every step): ``total = fit + alpha·isotropy penalty
        + gamma·redundancy penalty − eta·geometry bonus`` with the weights of
        ``config``; ``task="label_free"`` has no fit and no geometry term. A
        greedy probe baseline minimises its leave-one-out probe error; a metric
        selector the metric itself (``direction="lower"``) or its negative.
        """
        if self.method == "loes":
            weight = {name: _number(self.config.get(name)) for name in ("alpha", "gamma", "eta")}
            fit = (
                "fit (in-sample MSE)"
                if self.preset == "reference"
                else "fit (unexplained fraction)"
            )
            terms = [
                ScoreTerm("fit", "fit", fit, 1.0),
                ScoreTerm(
                    "isotropy",
                    "isotropy_penalty",
                    "isotropy penalty",
                    weight["alpha"],
                    symbol="alpha",
                ),
                ScoreTerm(
                    "redundancy",
                    "redundancy_penalty",
                    "redundancy penalty",
                    weight["gamma"],
                    symbol="gamma",
                ),
                ScoreTerm(
                    "geometry", "geometry_bonus", "geometry bonus", weight["eta"], -1, symbol="eta"
                ),
            ]
            return terms[1:3] if self.task == "label_free" else terms
        metric = self.config.get("metric")
        if self.steps and metric in self.steps[0].terms:
            sign = 1 if self.config.get("direction", "lower") == "lower" else -1
            return [ScoreTerm(metric, metric, metric, 1.0, sign)]
        return [ScoreTerm("fit", "probe_error", "leave-one-out probe error", 1.0)]

    def score_formula(self) -> str:
        """How the total is formed, e.g. ``"total = fit (unexplained fraction) + 0.1·isotropy
        penalty + 0.1·redundancy penalty − 0.05·geometry bonus; lower is better"``."""
        parts = []
        for term in self.score_terms():
            coef = term.symbol if term.weight is None else _coef(term.weight)
            text = f"{coef}·{term.label}" if coef else term.label
            if parts:
                parts.append(f"{'−' if term.sign < 0 else '+'} {text}")
            else:
                parts.append(text if term.sign > 0 else f"−{text}")
        return "total = " + " ".join(parts) + "; lower is better"

    def score_table(self, step: int = 1) -> list[dict[str, float]]:
        """Every candidate of a step (1-based), sorted by total score (lowest, the pick, first).

        Each row has ``"layer"``, one key per score term (:meth:`score_terms`:
        ``"fit"``, ``"isotropy_penalty"``, ``"redundancy_penalty"``,
        ``"geometry_bonus"`` for LOES; unweighted) and ``"total"``, which
        equals the sum of the terms times their signed weights
        (:meth:`score_formula`).
        """
        if not 1 <= step <= len(self.steps):
            raise IndexError(f"step must be in 1..{len(self.steps)}; got {step}")
        table = self.steps[step - 1]
        terms = [t for t in self.score_terms() if t.key in table.terms]
        rows = []
        for i, layer in enumerate(table.candidates):
            row: dict[str, float] = {"layer": layer}
            row.update({t.column: table.terms[t.key][i] for t in terms})
            row["total"] = table.terms["total"][i]
            rows.append(row)
        return sorted(rows, key=lambda r: r["total"])

    def to_frame(self, probe: Any = None):
        """All steps as a long pandas DataFrame (one row per step and candidate).

        Columns: ``step``, ``selected`` (the pick of that step), ``layer``,
        ``name`` (the model's name of the layer, when known), ``probe_score``
        (with ``probe``: each layer's own cross-validated probe score), the
        score terms of :meth:`score_table` and ``total``. ``frame.attrs`` holds
        ``"formula"`` (:meth:`score_formula`) and ``"weights"`` (each term
        column's signed weight in the total).

        Parameters
        ----------
        probe : LayerSweep or mapping of int to float, optional
            Per-layer probe scores (:func:`loes.sweep_layers` on the calibration data).
        """
        try:
            import pandas as pd
        except ImportError as e:  # pragma: no cover - pandas comes with datasets
            raise ImportError("LOESResult.to_frame requires pandas: pip install pandas") from e
        scores, _ = probe_scores(probe)
        rows = []
        for table in self.steps:
            for row in self.score_table(table.step):
                layer = int(row["layer"])
                extra: dict[str, Any] = {}
                if self.layer_names:
                    extra["name"] = self.layer_names[layer]
                if scores is not None:
                    extra["probe_score"] = scores.get(layer, float("nan"))
                rows.append(
                    {
                        "step": table.step,
                        "selected": layer == table.selected,
                        "layer": layer,
                        **extra,
                        **{k: v for k, v in row.items() if k != "layer"},
                    }
                )
        frame = pd.DataFrame(rows)
        frame.attrs["formula"] = self.score_formula()
        frame.attrs["weights"] = {t.column: t.signed_weight for t in self.score_terms()}
        return frame

    def explain(self, probe: Any = None) -> list[str]:
        """One sentence per pick saying, in the numbers' own terms, why it won.

        Each pick is set against its competitor: the candidate with the best
        own probe score (when ``probe`` is given and that is not the pick),
        else the runner-up by total. The terms that separate them follow,
        largest first, each ending with its weighted share of the difference
        in total (positive: in favour of the pick). A redundancy names the
        already selected layer the candidate repeats.

        Parameters
        ----------
        probe : LayerSweep or mapping of int to float, optional
            Per-layer probe scores (higher is better).

        Returns
        -------
        list of str, one per step

        Examples
        --------
        ``"step 2: 5 over 4 (best own probe score, 0.861 vs 0.802), total 0.8121 vs
        0.9016: 4 repeats 3 (CKA 0.88 vs 0.53; +0.035); 5 explains 0.05 more of the
        residual (fit 0.74 vs 0.79; +0.054)"``
        """
        scores, _ = probe_scores(probe)
        return [self._why(table, scores) for table in self.steps]

    def _why(self, table: StepTable, scores: dict[int, float] | None) -> str:
        pick, cands = table.selected, table.candidates
        name = lambda layer: layer_label(layer, self.layer_names)  # noqa: E731
        head = f"step {table.step}: {name(pick)}"
        others = [c for c in cands if c != pick]
        if not others:
            return head + " (the only candidate left)"
        total = dict(zip(cands, table.terms["total"]))
        rival = min(others, key=lambda c: (_finite_or_inf(total[c]), c))
        role = "runner-up"
        if scores is not None:
            strongest = max(others, key=lambda c: (_finite_or(scores.get(c), -math.inf), -c))
            s_rival, s_pick = scores.get(strongest), scores.get(pick)
            if s_rival is not None and (s_pick is None or s_rival > s_pick):
                rival = strongest
                role = f"best own probe score, {s_rival:.3f} vs {format_number(s_pick, '.3f')}"
        reasons = []
        i_p, i_c = cands.index(pick), cands.index(rival)
        for term in self.score_terms():
            if term.weight is None or term.key not in table.terms:
                continue
            xp, xc = table.terms[term.key][i_p], table.terms[term.key][i_c]
            share = term.signed_weight * (xc - xp)
            if math.isfinite(share) and abs(share) > 1e-12:
                reasons.append(
                    (
                        abs(share),
                        self._reason(term, table, pick, rival, xp, xc) + f"; {share:+.3g})",
                    )
                )
        text = (
            f"{head} over {name(rival)} ({role}), total {format_number(total[pick])} vs "
            f"{format_number(total[rival])}"
        )
        largest = max((r[0] for r in reasons), default=0.0)
        shown = [
            r for s, r in sorted(reasons, key=lambda r: -r[0]) if s >= 0.02 * largest
        ]  # drop trivia
        if shown:
            text += ": " + "; ".join(shown)
        return text

    def _reason(
        self, term: ScoreTerm, table: StepTable, pick: int, rival: int, xp: float, xc: float
    ) -> str:
        """The phrase for one term separating ``pick`` from ``rival`` (without the closing bracket)."""
        name = lambda layer: layer_label(layer, self.layer_names)  # noqa: E731
        better, worse, xb, xw = (
            (pick, rival, xp, xc) if term.signed_weight * (xc - xp) > 0 else (rival, pick, xc, xp)
        )
        if term.key == "fit" and term.column == "fit":
            target = (
                "residual"
                if table.step > 1
                else ("targets" if self.task == "regression" else "labels")
            )
            if self.preset == "reference":
                return (
                    f"{name(better)} fits the {target} closer (in-sample MSE {xb:.3g} vs {xw:.3g}"
                )
            return f"{name(better)} explains {xw - xb:.3f} more of the {target} (fit {xb:.3f} vs {xw:.3f}"
        if term.key == "redundancy":
            similar = "CKA" if self.preset != "reference" else "similarity"
            twin = self._repeated(table.step, worse)
            of = f" {name(twin)}" if twin is not None else " a selected layer"
            return f"{name(worse)} repeats{of} ({similar} {xw:.2f} vs {xb:.2f}"
        if term.key == "isotropy":
            return f"{name(better)} is more isotropic (isotropy penalty {xb:.2f} vs {xw:.2f}"
        if term.key == "geometry":
            return f"{name(better)} spreads the class centroids wider (geometry bonus {xb:.3g} vs {xw:.3g}"
        return f"{name(better)} has the better {term.label} ({xb:.4g} vs {xw:.4g}"

    def _repeated(self, step: int, layer: int) -> int | None:
        """The selected layer whose similarity is ``layer``'s redundancy at ``step``.

        The redundancy is the maximum over the layers picked so far, so it last
        rose at the step right after that layer was picked.
        """
        for t in range(step, 1, -1):
            now = self.steps[t - 1].row(layer)["redundancy"]
            before = self.steps[t - 2].row(layer)["redundancy"] if t > 2 else 0.0
            if now > before:
                return self.steps[t - 2].selected
        return None

    def summary(self, probe: Any = None) -> str:
        """A plain-text report: the picks, why each won, then the first step's score table.

        Parameters
        ----------
        probe : LayerSweep or mapping of int to float, optional
            Each layer's own cross-validated probe score (e.g.
            ``loes.sweep_layers(embeddings, targets)`` on the calibration
            data), shown beside the LOES scores so that a strong layer that
            was skipped is explained at a glance. Omitted when None.
        """
        name = lambda i: layer_label(i, self.layer_names)  # noqa: E731
        width = max([5] + [len(name(i)) for i in range(self.num_layers_seen)])
        lines = [
            f"{self.label()}: selected layers {self.selected_layers} "
            f"from {self.num_layers_seen} layers, N={self.num_calibration_samples}",
        ]
        if self.model_name:
            lines.append(f"model: {self.model_name}  pooling: {self.pooling}")
        if self.estimate is not None:
            where = "" if self.estimate.rows == "calibration" else " (held-out rows)"
            lines.append(f"verdict{where}: " + self.estimate.verdict())
        lines.append(f"{'pick':>4}  {'layer':<{width}} {'score':>10}")
        for i, (layer, score) in enumerate(zip(self.selected_layers, self.layer_scores), 1):
            lines.append(f"{i:>4}  {name(layer):<{width}} {format_number(score):>10}")
        scores, probe_name = probe_scores(probe)
        if self.steps:
            lines.append("")
            lines.append("why:")
            lines.extend("  " + s for s in self.explain(probe))
            terms = [t for t in self.score_terms() if t.key in self.steps[0].terms]
            heads = (
                ([probe_name] if scores is not None else []) + [t.label for t in terms] + ["total"]
            )
            weights = ([""] if scores is not None else []) + [t.weight_text for t in terms] + [""]
            widths = [max(9, len(h)) for h in heads]
            lines.append("")
            lines.append(f"step 1 scores: {self.score_formula()}")
            lines.append(
                f"{'layer':<{width}} " + " ".join(f"{h:>{w}}" for h, w in zip(heads, widths))
            )
            lines.append(f"{'':<{width}} " + " ".join(f"{h:>{w}}" for h, w in zip(weights, widths)))
            for row in sorted(self.score_table(1), key=lambda r: r["layer"]):
                layer = int(row["layer"])
                cells = (
                    ([format_number(scores.get(layer))] if scores is not None else [])
                    + [format_number(row.get(t.column)) for t in terms]
                    + [format_number(row["total"])]
                )
                mark = " *" if layer in self.selected_layers else ""
                lines.append(
                    f"{name(layer):<{width}} "
                    + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths))
                    + mark
                )
        if self.excluded_layers:
            lines.append(f"excluded (constant) layers: {[name(i) for i in self.excluded_layers]}")
        if self.estimate is not None:
            lines += [
                "",
                f"estimate (cross-validated probe on {self.estimate.rows_used()}):",
                self.estimate.table(),
            ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def label(self) -> str:
        """``"LOES (robust, classification)"`` or ``"last_k (classification)"``."""
        if self.method == "loes":
            return f"LOES ({self.preset}, {self.task})"
        return f"{self.method} ({self.task})"

    # ------------------------------------------------------------ serialising
    def to_dict(self) -> dict[str, Any]:
        """A strict-JSON dict (:mod:`loes._json`: NaN as None); :meth:`from_dict` inverts it."""
        return to_jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LOESResult:
        """Inverse of :meth:`to_dict`: None scores become NaN again.

        A dict written before results had a ``method`` field still loads: the
        method is ``config["method"]`` (baselines and metrics set it, and their
        ``preset`` then held that name, not a LOES preset), else ``"loes"``.
        """
        d = check_fields(cls, d, "LOES result")
        if "method" not in d:
            method = (d.get("config") or {}).get("method")
            d["method"], d["preset"] = (
                ("loes", d.get("preset", "robust")) if method is None else (method, None)
            )
        d["layer_scores"] = [float_or_nan(v) for v in d["layer_scores"]]
        if d.get("estimate") is not None:
            d["estimate"] = Estimate.from_dict(d["estimate"])
        d["steps"] = [
            StepTable(
                **{**s, "terms": {k: [float_or_nan(v) for v in vs] for k, vs in s["terms"].items()}}
            )
            for s in d.get("steps", [])
        ]
        return cls(**d)

    def to_json(self, path: str | None = None, **kwargs: Any) -> str:
        """Serialise to strict JSON (NaN as ``null``); also write it to ``path`` when given."""
        kwargs.setdefault("indent", 2)
        text = dumps(self.to_dict(), **kwargs)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> LOESResult:
        """Inverse of :meth:`to_json`: a JSON string or a path to a JSON file."""
        return cls.from_dict(read_json_object(text_or_path, "LOES result"))


def read_json_object(source: str | os.PathLike, what: str) -> dict[str, Any]:
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
            raise LOESError(
                f"{where} is not valid JSON ({e}); expected what to_json writes"
            ) from None
    elif isinstance(source, (str, os.PathLike)):
        where = f"{what} file {os.fspath(source)!r}"
        value = load_json_file(source, what)
    else:
        raise LOESError(
            f"expected JSON text or the path of a JSON file ({what}); got {type(source).__name__}"
            + ("; for a dict use from_dict" if isinstance(source, Mapping) else "")
        )
    if not isinstance(value, dict):
        raise LOESError(f"{where} holds a JSON {type(value).__name__}, not a JSON object ({what})")
    return value


def check_fields(cls: type, d: Any, what: str) -> dict[str, Any]:
    """A copy of ``d`` after checking it has every required field of dataclass ``cls`` and no other.

    Raises
    ------
    LOESError
        Naming the missing and unknown fields.
    """
    if not isinstance(d, Mapping):
        raise LOESError(f"expected a dict ({what}); got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    required = {
        f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
    }
    missing, unknown = sorted(required - set(d)), sorted(set(d) - known)
    if missing or unknown:
        problems = ([f"missing field(s) {missing}"] if missing else []) + (
            [f"unknown field(s) {unknown}"] if unknown else []
        )
        raise LOESError(
            f"{what} dict with {'; '.join(problems)}: pass what {cls.__name__}.to_dict "
            "or to_json wrote"
        )
    return dict(d)


def format_number(value: float | None, spec: str = ".4f") -> str:
    """``value`` formatted by ``spec``; ``"—"`` for an absent (None or NaN) number."""
    if value is None or math.isnan(value):
        return "—"
    return format(value, spec)


def probe_scores(probe: Any) -> tuple[dict[int, float] | None, str]:
    """``({layer: score}, column label)`` of a fitted LayerSweep or a mapping; ``(None, "")``."""
    if probe is None:
        return None, ""
    if hasattr(probe, "scores_") and hasattr(probe, "layers_"):
        metric = "accuracy" if getattr(probe, "task_", "") == "classification" else "R²"
        return {
            int(l): float(s) for l, s in zip(probe.layers_, probe.scores_)
        }, f"own probe (CV {metric})"
    if isinstance(probe, Mapping):
        return {int(l): float(s) for l, s in probe.items()}, "own probe score"
    raise LOESError(
        f"probe must be a fitted LayerSweep (loes.sweep_layers) or a mapping of layer to "
        f"score; got {type(probe).__name__}"
    )


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _coef(weight: float) -> str:
    """A weight as a coefficient: ``""`` for 1, else ``"0.1"``."""
    return "" if weight == 1 else format(weight, "g")


def _finite_or(value: float | None, default: float) -> float:
    return value if value is not None and math.isfinite(value) else default


def _finite_or_inf(value: float) -> float:
    return _finite_or(value, math.inf)
