"""The main job: ``loes demo`` shows, on real data, what LOES picks and whether it is worth it.

Two packaged cases, both all-MiniLM-L6-v2 (mean pooled, ``max_length`` 128):

- ``bbc``: BBC News topics (600 articles, stratified) — the last layer is
  the best single layer;
- ``drugreview``: the drug-review 3-way rating (979 reviews) — middle layers
  beat the last.

Each case follows the quality benchmark's protocol (``benchmarks/_quality.py``):
every layer is extracted once (cached under the output folder), then over R
stratified re-splits (calibration 20 % / train 50 % / test 30 %) LOES
(``k="auto"`` and ``k=3``) selects on the calibration rows only, the baselines
are the last layer, the last three layers and all layers, and a logistic probe
on the per-layer standardised, concatenated picks is trained on train and
scored on test. The demo prints mean ± std of test accuracy per method, the
majority-class rate, the calibration-only estimate of LOES-auto on the first
split (``result.estimate.verdict()``) and one verdict per case, computed from
the paired differences LOES-auto − last layer; it writes ``report.html``
opening with those verdicts and a comparison figure per case, then the why.

Run ``loes demo`` (:mod:`loes.cli.demo`); ``--quick`` uses fewer rows.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loes import _json
from loes._exceptions import LOESError
from loes._naming import layer_label
from loes._progress import ProgressSetting
from loes._splits import split_indices
from loes.core import select_layers_from_custom_embeddings
from loes.datasets import load_bbc_news, load_drugreview, minilm_path
from loes.hf import extract_embeddings
from loes.hf._models import load_config, n_hidden_layers
from loes.report import plot_methods, write_report
from loes.transfer import LinearProbe

__all__ = ["DEMO_TASKS", "CaseResult", "DemoOutput", "run_demo", "verdict_line"]

logger = logging.getLogger(__name__)

#: Demo cases: texts used (full / quick) and a description.
DEMO_TASKS: dict[str, dict[str, Any]] = {
    "bbc": {
        "samples": 600,
        "quick": 300,
        "label": "BBC News topics (5 classes)",
        "short": "BBC topics",
    },
    "drugreview": {
        "samples": 979,
        "quick": 979,
        "label": "drug-review rating (negative / neutral / positive)",
        "short": "drug-review rating",
    },
}
#: Shares of the calibration, train and test rows of one split (as in the quality benchmark).
FRACTIONS = (0.2, 0.5, 0.3)
#: Methods compared, in display order.
METHODS = ("loes_auto", "loes_k", "last", "last_k", "all")
#: Inverse regularisation strengths the logistic probe chooses from (on a validation holdout of train).
PROBE_GRID = (0.01, 0.1, 1.0)


@dataclass
class CaseResult:
    """One demo case over its re-splits.

    Attributes
    ----------
    task : str
    scores : dict of method -> list of float
        Test accuracy of each method per split (methods: :data:`METHODS`).
    layers : dict of method -> list of list of int
        The layers each method used per split.
    majority : float
        Share of the majority class.
    selection_time : list of float
        Seconds LOES-auto's selection took per split.
    result : LOESResult
        LOES-auto's selection on the first split (with ``result.estimate``).
    n_samples : dict of str -> int
        Rows in calibration, train and test (first split) and in all.
    """

    task: str
    scores: dict[str, list[float]]
    layers: dict[str, list[list[int]]]
    majority: float
    selection_time: list[float]
    result: Any
    n_samples: dict[str, int]
    figure: Path | None = None
    report: Path | None = None
    calibration: Any = field(default=None, repr=False)

    def mean(self, method: str) -> float:
        return float(np.mean(self.scores[method]))

    def std(self, method: str) -> float:
        return float(np.std(self.scores[method], ddof=1)) if len(self.scores[method]) > 1 else 0.0

    def difference(self, method: str = "loes_auto", reference: str = "last") -> tuple[float, float]:
        """Mean paired difference ``method − reference`` over the splits and its standard error
        (NaN with one split)."""
        d = np.asarray(self.scores[method]) - np.asarray(self.scores[reference])
        se = float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
        return float(d.mean()), se

    def verdict(self) -> str:
        return verdict_line(self)

    def to_dict(self) -> dict[str, Any]:
        d, se = self.difference()
        return {
            "task": self.task,
            "majority": self.majority,
            "n_samples": self.n_samples,
            "methods": {
                m: {
                    "scores": self.scores[m],
                    "mean": self.mean(m),
                    "std": self.std(m),
                    "layers": self.layers[m],
                }
                for m in METHODS
            },
            "loes_auto_minus_last": {"mean": d, "se": se},
            "selection_time": self.selection_time,
            "estimate": self.result.estimate.verdict()
            if self.result.estimate is not None
            else None,
            "verdict": self.verdict(),
        }


def verdict_line(case: CaseResult) -> str:
    """One truthful line: what LOES-auto picked (first split), the gain over the last layer
    on test (mean ± SE of the paired differences over the splits, "within noise" below two
    standard errors) and the selection's mean cost in seconds."""
    name = DEMO_TASKS[case.task]["short"]
    picked = case.layers["loes_auto"][0]
    last = case.layers["last"][0]
    names = case.result.layer_names if case.result is not None else None
    shown = ", ".join(layer_label(i, names) for i in picked)
    n = len(case.scores["last"])
    same = sum(p == last for p in case.layers["loes_auto"])
    seconds = f"selection {np.mean(case.selection_time):.1f} s"
    head = f"{name}: loes picked {shown}" + (", the last layer" if picked == last else "")
    if n > 1 and same < n:
        head += (
            f" on split 0 ({n - same} of {n} splits picked otherwise)"
            if picked == last
            else (f" on split 0 (the last layer alone on {same} of {n} splits)" if same else "")
        )
    d, se = case.difference()
    best = max(METHODS, key=case.mean)
    if case.mean(best) > case.mean("loes_auto"):
        seconds = f"best here: {best} {case.mean(best):.3f}; {seconds}"
    gap = (
        f"{100 * d:+.1f} ± {100 * se:.1f} points"
        if np.isfinite(se)
        else f"{100 * d:+.1f} points (one split)"
    )
    where = (
        f"test accuracy {case.mean('loes_auto'):.3f} vs {case.mean('last'):.3f}, majority class "
        f"{case.majority:.3f}, {n} split{'s' if n > 1 else ''}"
    )
    if same == n:
        return (
            f"{head}: the pick is the last layer (test accuracy {case.mean('last'):.3f}, majority class "
            f"{case.majority:.3f}, {n} split{'s' if n > 1 else ''}); {seconds}"
        )
    if not np.isfinite(se) or abs(d) <= 2 * se:
        return f"{head}; the last layer is as good: {gap}, within noise ({where}); {seconds}"
    side = "over" if d > 0 else "below"
    return f"{head}: {gap} {side} the last layer ({where}); {seconds}"


@dataclass
class DemoOutput:
    """What :func:`run_demo` produced.

    Attributes
    ----------
    cases : dict of task -> CaseResult
    paths : dict of str to pathlib.Path
        ``report`` (the opening page), ``result`` (JSON of every case) and per case
        ``<task>_report`` and ``<task>_comparison``.
    timings : dict of str to float
        Seconds per phase (``<task>_extract``, ``<task>_splits``, ``report``, ``total``).
    """

    cases: dict[str, CaseResult]
    paths: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cases": {t: c.to_dict() for t, c in self.cases.items()},
            "timings": self.timings,
            "paths": {k: str(v) for k, v in self.paths.items()},
        }


def _texts(task: str, n: int):
    if task == "drugreview":
        return load_drugreview("all")
    return load_bbc_news(max_per_class=max(2, n // 5), random_state=0)  # n / 5 articles per topic


def _split(
    r: int,
    x: torch.Tensor,
    y: np.ndarray,
    provenance: dict[str, Any],
    probe: str,
    k: int,
    with_estimate: bool,
) -> tuple[dict[str, list[int]], dict[str, float], float, Any]:
    """One re-split: LOES selects on calibration, every method's probe is trained on train
    and scored on test. Returns (layers, scores, LOES-auto seconds, LOES-auto result)."""
    cal, tr, te = split_indices(len(y), FRACTIONS, random_state=r, labels=y)
    n_layers = x.shape[1]
    t = time.perf_counter()
    auto = select_layers_from_custom_embeddings(
        x[cal], y[cal], k="auto", show_progress=False, estimate=with_estimate, **provenance
    )
    seconds = time.perf_counter() - t
    fixed = select_layers_from_custom_embeddings(
        x[cal], y[cal], k=k, show_progress=False, estimate=False, **provenance
    )
    layers = {
        "loes_auto": list(auto.selected_layers),
        "loes_k": list(fixed.selected_layers),
        "last": [n_layers - 1],
        "last_k": list(range(n_layers - k, n_layers)),
        "all": list(range(n_layers)),
    }
    scored: dict[tuple[int, ...], float] = {}
    for picks in layers.values():
        key = tuple(sorted(picks))
        if key not in scored:
            model = LinearProbe(layers=list(key), kind=probe, grid=PROBE_GRID, random_state=r)
            scored[key] = model.fit(x[tr], y[tr]).score(x[te], y[te])
    scores = {m: float(scored[tuple(sorted(p))]) for m, p in layers.items()}
    return layers, scores, seconds, auto


def _run_case(
    task: str,
    out: Path,
    *,
    splits: int,
    k: int,
    quick: bool,
    probe: str,
    model: str | None,
    max_samples: int | None,
    max_length: int | None,
    show_progress: ProgressSetting,
    echo: Callable[[str], None],
    timings: dict[str, float],
) -> CaseResult:
    spec = DEMO_TASKS[task]
    n = spec["quick"] if quick else spec["samples"]
    n = min(n, max_samples) if max_samples else n
    max_length = max_length or (64 if quick else 128)
    model_label = "all-MiniLM-L6-v2" if model is None else str(model)
    t = time.perf_counter()
    ds = _texts(task, n)
    emb = extract_embeddings(
        model or minilm_path(),
        ds,
        task="classification",
        max_samples=min(n, len(ds)),
        pooling="masked_mean",
        max_length=max_length,
        batch_size=32,
        cache_dir=out / "cache",
        random_state=0,
        show_progress=show_progress,
    )
    timings[f"{task}_extract"] = time.perf_counter() - t
    x = emb.embeddings
    y = np.asarray(emb.targets)
    provenance = {
        "layer_names": list(emb.layer_names),
        "pooling": emb.pooling,
        "dataset": task,
        "model_name": model_label,
    }
    majority = float(np.bincount(np.unique(y, return_inverse=True)[1]).max() / len(y))
    source = "from cache" if emb.from_cache else f"extracted in {timings[f'{task}_extract']:.0f} s"
    echo(
        f"\n== {spec['label']}: {model_label}, {x.shape[0]} texts x {x.shape[1]} layers x {x.shape[2]} "
        f"dims, mean pooled, max_length {max_length} ({source})"
    )

    if k > x.shape[1]:
        raise LOESError(f"k must be at most the {x.shape[1]} layers of the model; got {k}")
    t = time.perf_counter()
    scores: dict[str, list[float]] = {m: [] for m in METHODS}
    layers: dict[str, list[list[int]]] = {m: [] for m in METHODS}
    seconds: list[float] = []
    first = None
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # many small solves: one thread avoids oversubscription on a busy machine
    try:
        for r in range(splits):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                picks, split_scores, sec, auto = _split(
                    r, x, y, provenance, probe, k, with_estimate=r == 0
                )
            seen = set()
            for w in caught:  # name the split in every warning raised inside it, once per message
                if (str(w.message), w.category) not in seen:
                    seen.add((str(w.message), w.category))
                    warnings.warn_explicit(
                        f"split {r}: {w.message}", w.category, w.filename, w.lineno
                    )
            for m in METHODS:
                scores[m].append(split_scores[m])
                layers[m].append(picks[m])
            seconds.append(sec)
            first = first or auto
    finally:
        torch.set_num_threads(threads)
    timings[f"{task}_splits"] = time.perf_counter() - t
    cal, tr, te = split_indices(len(y), FRACTIONS, random_state=0, labels=y)
    case = CaseResult(
        task=task,
        scores=scores,
        layers=layers,
        majority=majority,
        selection_time=seconds,
        result=first,
        n_samples={"calibration": len(cal), "train": len(tr), "test": len(te), "all": len(y)},
    )

    echo(
        f"k = {k} for loes_k and last_k; {splits} stratified re-splits, calibration {len(cal)} / train {len(tr)} / test {len(te)}; "
        f"LOES selects on calibration only; {probe} probe trained on train, scored on test"
    )
    echo(f"{'method':<10} {'layers (split 0)':<22} {'test acc':>8} {'± std':>6}")
    for m in METHODS:
        echo(
            f"{m:<10} {str(layers[m][0]) if m != 'all' else 'all ' + str(x.shape[1]):<22} "
            f"{case.mean(m):>8.3f} {case.std(m):>6.3f}"
        )
    echo(f"{'majority':<10} {'':<22} {majority:>8.3f}")
    if first.estimate is not None:
        echo(f"calibration-only estimate (split 0): {first.estimate.verdict()}")
    case.calibration = (x[cal], y[cal])
    case.figure = out / task / "comparison.png"
    case.figure.parent.mkdir(parents=True, exist_ok=True)
    plot_methods(
        list(METHODS),
        [case.mean(m) for m in METHODS],
        [case.std(m) for m in METHODS],
        majority,
        case.figure,
        title=f"{spec['short']}: test accuracy, {splits} splits",
        ylabel=f"test accuracy (mean ± std, {splits} splits)",
        highlight=("loes_auto", "loes_k"),
    )
    first.to_json(str(out / task / "result.json"))
    case.report = write_report(
        first,
        out / task,
        embeddings=x[cal],
        targets=y[cal],
        title=f"LOES demo — {model_label}, {spec['label']}",
        verdicts=[(case.verdict(), "comparison.png")],
    )
    return case


def run_demo(
    output: str = "loes-demo-output",
    *,
    task: str = "both",
    k: int = 3,
    splits: int = 3,
    quick: bool = False,
    probe: str = "logistic",
    model: str | None = None,
    max_samples: int | None = None,
    max_length: int | None = None,
    show_progress: ProgressSetting = "auto",
    echo: Callable[[str], None] = print,
) -> DemoOutput:
    """Run the offline demo end to end and write its report.

    Parameters
    ----------
    output : str
        Output folder (created); the feature cache lives in ``output/cache``.
    task : {"both", "bbc", "drugreview"}
    k : int
        Layers of the fixed-k LOES (``loes_k``) and of the last-k baseline (``last_k``).
    splits : int
        Stratified re-splits (calibration 20 % / train 50 % / test 30 %).
    quick : bool
        Fewer rows (for tests and a first look).
    probe : {"logistic", "ridge"}
        The probe trained on each method's layers.
    model : str, optional
        A local model folder (default: the packaged all-MiniLM-L6-v2).
    max_samples, max_length : int, optional
        Cap the texts per case and override the token limit (128; 64 with ``quick``).
    show_progress : bool or str
    echo : callable
        Where the printed lines go (``print`` by default).

    Returns
    -------
    DemoOutput
    """
    tasks = list(DEMO_TASKS) if task == "both" else [task]
    if task != "both" and task not in DEMO_TASKS:
        raise LOESError(f"task must be 'both' or one of {sorted(DEMO_TASKS)}; got {task!r}")
    if k < 1:
        raise LOESError(f"k must be at least 1; got {k}")
    if splits < 1:
        raise LOESError(f"splits must be at least 1; got {splits}")
    if probe not in ("logistic", "ridge"):
        raise LOESError(f"probe must be 'logistic' or 'ridge'; got {probe!r}")
    n_layers = n_hidden_layers(load_config(str(model or minilm_path())))
    if n_layers is not None and k > n_layers:
        raise LOESError(
            f"k={k} but the model has {n_layers} layers (config.num_hidden_layers): pass "
            f"--k {n_layers} or fewer"
        )
    t0 = time.perf_counter()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    cases = {
        t: _run_case(
            t,
            out,
            splits=splits,
            k=k,
            quick=quick,
            probe=probe,
            model=model,
            max_samples=max_samples,
            max_length=max_length,
            show_progress=show_progress,
            echo=echo,
            timings=timings,
        )
        for t in tasks
    }

    t = time.perf_counter()
    paths: dict[str, Path] = {}
    for name, case in cases.items():
        paths[f"{name}_report"], paths[f"{name}_comparison"] = case.report, case.figure
    # the opening page: every case's verdict and figure, then the why of the last case
    why = cases[tasks[-1]]
    links = " · ".join(f'<a href="{n}/report.html">{n}: full report</a>' for n in cases)
    paths["report"] = write_report(
        why.result,
        out,
        title="LOES demo — all-MiniLM-L6-v2" if model is None else f"LOES demo — {model}",
        embeddings=why.calibration[0],
        targets=why.calibration[1],
        verdicts=[(c.verdict(), f"{n}/comparison.png") for n, c in cases.items()],
        note=f"{links}. Below: why loes picked what it did on the {DEMO_TASKS[tasks[-1]]['label']} "
        "(split 0's calibration rows).",
    )
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    demo = DemoOutput(cases=cases, paths=paths, timings=timings)
    paths["result"] = out / "demo.json"
    paths["result"].write_text(_json.dumps(demo.to_dict(), indent=2) + "\n", encoding="utf-8")
    echo("\nverdict")
    for case in cases.values():
        echo("  " + case.verdict())
    echo(
        f"\nwrote {paths['report']} and {paths['result'].name} in {out} [{timings['total']:.0f} s]"
    )
    return demo
