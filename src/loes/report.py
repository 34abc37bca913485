"""Plots and an HTML report of a layer selection (needs ``loes[plot]``).

* :func:`plot_result` — per-layer score terms at each greedy step;
* :func:`plot_trace` — the selection trace: every candidate's total score at
  every step, the picks marked;
* :func:`plot_cka` — the layer-by-layer linear CKA heatmap;
* :func:`plot_per_layer` — test score of a probe on each single layer;
* :func:`plot_comparison` — LOES against the baselines;
* :func:`write_report` — all of the above as PNGs plus ``report.html``.

Figures are built with :class:`matplotlib.figure.Figure` (no pyplot state, no
GUI backend), so they work headless.
"""

from __future__ import annotations

import html
import logging
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loes._deps import require
from loes._exceptions import LOESError
from loes._linalg import cka_matrix
from loes._naming import layer_label
from loes._rng import torch_generator
from loes._validation import check_embeddings
from loes.evaluate import METRIC_LABELS
from loes.result import LOESResult, format_number, probe_scores
from loes.sweep import sweep_layers

__all__ = [
    "cka_heatmap_matrix",
    "plot_cka",
    "plot_comparison",
    "plot_per_layer",
    "plot_result",
    "plot_trace",
    "write_report",
]

logger = logging.getLogger(__name__)

#: Line colour of each score term (keys of ``StepTable.terms``); labels come from
#: :meth:`LOESResult.score_terms`.
_TERM_COLORS = {
    "fit": "#1f77b4",
    "isotropy": "#ff7f0e",
    "redundancy": "#2ca02c",
    "geometry": "#9467bd",
}


def _figure(figsize):
    require("matplotlib", extra="plot")
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _save(fig, path: str | os.PathLike | None) -> None:
    if path is not None:
        fig.savefig(os.fspath(path), dpi=110)


def plot_result(
    result: LOESResult,
    path: str | os.PathLike | None = None,
    *,
    steps: Sequence[int] | None = None,
    figsize: Sequence[float] | None = None,
):
    """Plot every candidate's score terms at each greedy step.

    One panel per step: the unweighted terms (lines, labelled with the weight
    and sign with which each enters the total) and the weighted total (bars)
    for each candidate layer; the layer picked at that step is marked. The
    title states how the total is formed (:meth:`LOESResult.score_formula`).

    Parameters
    ----------
    result : LOESResult
    path : str or path, optional
        Also write the figure there (PNG, SVG, PDF by extension).
    steps : sequence of int, optional
        1-based steps to show (all by default).
    figsize : (width, height), optional

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    LOESError
        When the result holds no step tables (e.g. a fixed baseline).
    """
    if not result.steps:
        raise LOESError(
            f"this result ({result.method}) has no per-step score tables to plot; "
            "only greedy selections (LOES, greedy_probe, metric selectors) have them"
        )
    steps = list(steps) if steps is not None else [t.step for t in result.steps]
    n = len(steps)
    fig = _figure(figsize or (7.5, 2.4 * n + 0.6))
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    for ax, step in zip(axes, steps):
        table = result.steps[step - 1]
        order = np.argsort(table.candidates)
        layers = np.asarray(table.candidates)[order]
        total = np.asarray(table.terms["total"], dtype=float)[order]
        colors = ["#d62728" if layer == table.selected else "#c7c7c7" for layer in layers]
        ax.bar(layers, total, color=colors, alpha=0.55, label="total (lower is better)", zorder=1)
        for term in result.score_terms():
            values = np.asarray(table.terms.get(term.key, []), dtype=float)
            if values.size and np.any(values != 0):
                ax.plot(
                    layers,
                    values[order],
                    marker="o",
                    ms=3,
                    lw=1.2,
                    color=_TERM_COLORS.get(term.key),
                    label=f"{term.label} ({term.weight_text})",
                    zorder=2,
                )
        ax.set_title(
            f"step {table.step}: picked layer {layer_label(table.selected, result.layer_names)}",
            fontsize=10,
        )
        ax.set_ylabel("term value / total", fontsize=8)
        ax.set_xticks(layers)
        ax.tick_params(labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    legend: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), fontsize=7, ncol=3, loc="outside lower center")
    axes[-1].set_xlabel("layer")
    fig.suptitle(
        f"{result.label()} — selected {result.selected_layers}\n"
        + textwrap.fill(result.score_formula(), 95),
        fontsize=9,
    )
    _save(fig, path)
    return fig


def plot_trace(
    result: LOESResult,
    path: str | os.PathLike | None = None,
    *,
    figsize: Sequence[float] | None = None,
):
    """The selection trace: total score of each candidate (columns) at each step (rows).

    Already-selected layers are blank; the pick of each step is boxed and
    numbered.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if not result.steps:
        raise LOESError(f"this result ({result.method}) has no per-step score tables")
    n_layers = result.num_layers_seen
    grid = np.full((len(result.steps), n_layers), np.nan)
    for r, table in enumerate(result.steps):
        for layer, value in zip(table.candidates, table.terms["total"]):
            grid[r, layer] = value
    fig = _figure(figsize or (max(5.0, 0.32 * n_layers + 2.5), 0.55 * len(result.steps) + 1.8))
    ax = fig.subplots()
    finite = grid[np.isfinite(grid)]
    im = ax.imshow(
        np.ma.masked_invalid(grid),
        aspect="auto",
        cmap="viridis_r",
        vmin=finite.min() if finite.size else 0,
        vmax=finite.max() if finite.size else 1,
    )
    for r, table in enumerate(result.steps):
        ax.add_patch(_rect(table.selected, r))
        ax.text(
            table.selected,
            r,
            str(r + 1),
            ha="center",
            va="center",
            color="white",
            fontsize=8,
            fontweight="bold",
        )
    ax.set_xticks(range(n_layers))
    ax.set_yticks(range(len(result.steps)))
    ax.set_yticklabels([f"step {t.step}" for t in result.steps])
    ax.tick_params(labelsize=7)
    ax.set_xlabel("layer")
    ax.set_title("selection trace: total score per candidate (lower is better)", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    _save(fig, path)
    return fig


def _rect(x: float, y: float):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="#d62728", lw=2)


def cka_heatmap_matrix(
    embeddings: Any, *, debiased: bool = True, max_samples: int | None = 512, random_state: Any = 0
) -> np.ndarray:
    """Layer-by-layer linear CKA (L, L): the quantity the robust selector's redundancy term uses.

    :func:`loes._linalg.cka_matrix` with the selector's defaults: the debiased
    estimator, on a subsample of ``max_samples`` rows drawn with
    ``random_state`` (the selector's ``cka_samples``, ``cka_debiased`` and
    ``random_state``), so the figure shows the redundancy the selector saw.
    """
    layers = [x.to(torch.float64) for x in check_embeddings(embeddings)]
    gen = torch_generator(random_state)
    return cka_matrix(layers, debiased=debiased, max_samples=max_samples, generator=gen).numpy()


def plot_cka(
    embeddings: Any = None,
    path: str | os.PathLike | None = None,
    *,
    cka: np.ndarray | None = None,
    selected: Sequence[int] | None = None,
    figsize: Sequence[float] | None = None,
):
    """Heatmap of linear CKA between every pair of layers (:func:`cka_heatmap_matrix`).

    Parameters
    ----------
    embeddings : array of shape (n_samples, n_layers, dim) or list of layers, optional
    cka : array of shape (n_layers, n_layers), optional
        A precomputed matrix (instead of ``embeddings``).
    selected : sequence of int, optional
        Layers to mark on the axes.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if cka is None:
        if embeddings is None:
            raise LOESError("plot_cka needs embeddings or a precomputed cka matrix")
        cka = cka_heatmap_matrix(embeddings)
    cka = np.asarray(cka, dtype=float)
    n = cka.shape[0]
    fig = _figure(figsize or (max(4.0, 0.3 * n + 2.5), max(3.5, 0.3 * n + 2.0)))
    ax = fig.subplots()
    im = ax.imshow(cka, vmin=0, vmax=1, cmap="magma", origin="lower")
    ticks = range(n) if n <= 32 else range(0, n, max(1, n // 16))
    ax.set_xticks(list(ticks))
    ax.set_yticks(list(ticks))
    ax.tick_params(labelsize=7)
    for layer in selected or []:
        for lab in ax.get_xticklabels() + ax.get_yticklabels():
            if lab.get_text() == str(layer):
                lab.set_color("#d62728")
                lab.set_fontweight("bold")
        ax.axvline(layer, color="#d62728", lw=0.6, alpha=0.6)
        ax.axhline(layer, color="#d62728", lw=0.6, alpha=0.6)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    f"{cka[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if cka[i, j] < 0.6 else "black",
                )
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title("linear CKA between layers", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    _save(fig, path)
    return fig


def plot_per_layer(
    evaluation: Any,
    path: str | os.PathLike | None = None,
    *,
    selected: Sequence[int] | None = None,
    figsize: Sequence[float] | None = None,
):
    """Test score of a probe trained on each single layer (mean ± std over seeds).

    Parameters
    ----------
    evaluation : EvaluationResult
        With ``per_layer`` filled (``evaluate(..., per_layer=True)``).
    selected : sequence of int, optional
        Layers to highlight (default: LOES's first-seed selection).

    Returns
    -------
    matplotlib.figure.Figure
    """
    if not evaluation.per_layer:
        raise LOESError(
            "this evaluation has no per-layer scores: run evaluate(..., per_layer=True)"
        )
    if selected is None and "loes" in evaluation.selections:
        selected = evaluation.selections["loes"]["selected_layers"]
    selected = set(selected or [])
    layers = evaluation.per_layer["layer"]
    mean = np.asarray(evaluation.per_layer["mean"])
    std = np.asarray(evaluation.per_layer["std"])
    fig = _figure(figsize or (max(5.0, 0.28 * len(layers) + 2.5), 3.2))
    ax = fig.subplots()
    colors = ["#d62728" if layer in selected else "#1f77b4" for layer in layers]
    ax.bar(layers, mean, yerr=std, color=colors, capsize=2)
    label = f"test {METRIC_LABELS.get(evaluation.metric, evaluation.metric)}"
    ax.set_ylabel(label)
    ax.set_xlabel("layer (red: selected by LOES)")
    if evaluation.metric == "accuracy":
        lo = max(0.0, float((mean - std).min()) - 0.05)
        ax.set_ylim(lo, min(1.0, float((mean + std).max()) + 0.03))
    ax.set_xticks(layers if len(layers) <= 32 else layers[::2])
    ax.tick_params(labelsize=7)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"single-layer {evaluation.probe} probe, {label}", fontsize=10)
    _save(fig, path)
    return fig


def plot_comparison(
    evaluation: Any,
    path: str | os.PathLike | None = None,
    *,
    figsize: Sequence[float] | None = None,
):
    """Mean test score ± std of every method (LOES highlighted).

    Returns
    -------
    matplotlib.figure.Figure
    """
    rows = evaluation.table()
    names = [r["method"] for r in rows]
    mean = np.array([r[evaluation.metric] for r in rows])
    std = np.array([r["std"] for r in rows])
    fig = _figure(figsize or (7.0, 0.35 * len(rows) + 1.4))
    ax = fig.subplots()
    colors = ["#d62728" if n == "loes" else "#7f7f7f" for n in names]
    y = np.arange(len(rows))[::-1]
    ax.barh(y, mean, xerr=std, color=colors, capsize=2)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    label = f"test {METRIC_LABELS.get(evaluation.metric, evaluation.metric)}"
    ax.set_xlabel(f"{label} (mean ± std over {len(evaluation.seeds)} seeds)")
    if evaluation.metric == "accuracy":
        ax.set_xlim(
            max(0.0, float((mean - std).min()) - 0.05), min(1.0, float((mean + std).max()) + 0.02)
        )
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"LOES vs baselines (k={evaluation.k}, {evaluation.probe} probe)", fontsize=10)
    _save(fig, path)
    return fig


def plot_methods(
    names: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    majority: float,
    path: str | os.PathLike | None = None,
    *,
    title: str = "",
    ylabel: str = "test accuracy (mean ± std)",
    highlight: Sequence[str] = ("loes",),
    figsize: Sequence[float] | None = None,
):
    """One bar per method with error bars; the y axis starts at the majority-class rate, drawn as a line.

    Parameters
    ----------
    names : sequence of str
        Methods, in display order (length M).
    mean, std : sequence of float of length M
        Mean test accuracy and its standard deviation over splits.
    majority : float
        Accuracy of always predicting the majority class.
    highlight : sequence of str
        Methods drawn in red (LOES).

    Returns
    -------
    matplotlib.figure.Figure
    """
    mean, std = np.asarray(mean, dtype=float), np.asarray(std, dtype=float)
    fig = _figure(figsize or (5.2, 3.0))
    ax = fig.subplots()
    colors = ["#d62728" if n in highlight else "#7f7f7f" for n in names]
    x = np.arange(len(names))
    top = float(max((mean + std).max(), majority))
    bottom = majority - 0.03 * max(top - majority, 0.01)
    ax.bar(x, mean - bottom, bottom=bottom, yerr=std, color=colors, capsize=3)
    ax.axhline(majority, color="k", lw=1, ls="--")
    for xi, m in zip(x, mean):  # the value inside the bar's foot, clear of the error bar
        ax.text(
            xi,
            bottom + 0.04 * (top - bottom),
            f"{m:.3f}",
            ha="center",
            va="bottom",
            fontsize=8,
            color="white",
            fontweight="bold",
        )
    ax.set_ylim(bottom, min(1.0, top + 0.08 * (top - bottom) + 0.005))
    ax.set_xticks(x)
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"{title}\n(axis starts at the majority class {majority:.3f}, dashed)", fontsize=9)
    _save(fig, path)
    return fig


# ------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:980px;
margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{border:1px solid #ddd;padding:.25em .55em;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}tr.loes,tr.pick{background:#fdecea;font-weight:600}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}.meta{color:#666;font-size:.85em}
.verdict{background:#f6f8fa;border-left:4px solid #d62728;padding:.4em 1em;margin:1em 0}
.verdict p{font-size:1.05em;margin:.5em 0}.verdict img{max-width:48%;margin-right:1%}
"""


def _table_html(
    headers: list[str],
    rows: list[list[Any]],
    left: Sequence[int] = (0,),
    row_classes: list[str] | None = None,
) -> str:
    out = [
        "<table><tr>"
        + "".join(
            f'<th class="{"l" if i in left else ""}">{html.escape(h)}</th>'
            for i, h in enumerate(headers)
        )
        + "</tr>"
    ]
    for r, row in enumerate(rows):
        cls = f' class="{row_classes[r]}"' if row_classes and row_classes[r] else ""
        out.append(
            f"<tr{cls}>"
            + "".join(
                f'<td class="{"l" if i in left else ""}">{html.escape(str(v))}</td>'
                for i, v in enumerate(row)
            )
            + "</tr>"
        )
    out.append("</table>")
    return "\n".join(out)


def _fmt(v: Any, digits: int = 4) -> str:
    """A table cell: ``""`` for None (not applicable), ``"—"`` for NaN (no score)."""
    if v is None:
        return ""
    if isinstance(v, float):
        return format_number(v, f".{digits}f")
    return str(v)


def _difference_legend(metric: str) -> str:
    """What the sign of "LOES − method" means for ``metric``."""
    if metric == "rmse":  # evaluations saved before R²: lower was better
        return "LOES−method is the mean paired difference of RMSE (negative: LOES erred less, which is better), "
    return "LOES−method is the mean paired difference (positive: LOES scored higher, which is better), "


def write_report(
    result: LOESResult,
    output_dir: str | os.PathLike,
    *,
    embeddings: Any = None,
    evaluation: Any = None,
    title: str | None = None,
    cka: np.ndarray | None = None,
    targets: Any = None,
    probe: Any = None,
    verdicts: Sequence[Sequence[str | None]] | None = None,
    note: str | None = None,
) -> Path:
    """Write ``report.html`` and its PNG figures to ``output_dir``.

    Parameters
    ----------
    result : LOESResult
        The selection to report (its step tables give the score-term and trace plots).
    output_dir : str or path
        Created if missing. Figures are written next to the HTML file.
    embeddings : array of shape (n_samples, n_layers, dim), optional
        The calibration embeddings: for the layer-by-layer CKA heatmap (or
        pass ``cka``) and, with ``targets``, each layer's own probe score.
    evaluation : EvaluationResult, optional
        Adds the comparison table, the comparison plot and per-layer probe scores.
    title : str, optional
    cka : array of shape (n_layers, n_layers), optional
        Precomputed CKA matrix.
    targets : array of shape (n_samples,) or (n_samples, m), optional
        The calibration targets. With ``embeddings``, each layer's own
        cross-validated probe score (:func:`loes.sweep_layers`) is shown
        beside the LOES scores and used in the why-sentences.
    probe : LayerSweep or mapping of int to float, optional
        Those per-layer probe scores, already computed (instead of ``targets``).
    verdicts : sequence of (str, str or None), optional
        The page's opening, before every other section: one line of verdict per
        case and the path of its comparison figure relative to ``output_dir``
        (:func:`plot_methods`), or None.
    note : str, optional
        HTML placed after the verdicts (e.g. links to other pages).

    Returns
    -------
    pathlib.Path
        The path of ``report.html``.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = title or f"LOES report — {result.model_name or 'custom embeddings'}"
    sections: list[str] = []
    figures: dict[str, str] = {}

    def figure(name: str, make) -> str | None:
        try:
            fig = make(out / name)
        except LOESError as e:
            logger.info("skipping %s: %s", name, e)
            return None
        del fig
        figures[name] = str(out / name)
        return name

    if (
        probe is None
        and targets is not None
        and embeddings is not None
        and result.task != "label_free"
    ):
        probe = sweep_layers(
            embeddings, targets, result.task, show_progress=False, layer_names=result.layer_names
        )
    scores, probe_name = probe_scores(probe)

    # summary
    name_of = lambda layer: layer_label(layer, result.layer_names)  # noqa: E731
    pick_rows = [
        [i + 1, name_of(layer), _fmt(score)] + ([_fmt(scores.get(layer))] if scores else [])
        for i, (layer, score) in enumerate(zip(result.selected_layers, result.layer_scores))
    ]
    made_by = (
        f"preset <b>{html.escape(result.preset)}</b>"
        if result.method == "loes"
        else f"method <b>{html.escape(result.method)}</b>"
    )
    meta = [
        made_by,
        f"task {html.escape(result.task)}",
        f"{result.num_layers_seen} layers",
        f"N = {result.num_calibration_samples} calibration samples",
        f"pooling {html.escape(str(result.pooling))}",
    ]
    if result.dataset:
        meta.append(f"data {html.escape(str(result.dataset))}")
    total_time = result.timings.get("total")
    if total_time is not None:
        meta.append(f"selection took {total_time:.2f} s")
    sections.append(
        "<h2>Selected layers</h2>"
        f'<p class="meta">{" · ".join(meta)}</p>'
        + _table_html(
            ["pick", "layer", "score (lower is better)"] + ([probe_name] if scores else []),
            pick_rows,
            left=(0, 1),
        )
    )
    est = result.estimate
    if est is not None:
        metric = "accuracy" if est.metric == "accuracy" else "R²"
        est_rows = [
            [
                name,
                ", ".join(layer_label(i, result.layer_names) for i in layers)
                if len(layers) <= 4
                else f"{len(layers)} layers",
                f"{est.mean[name]:.4f} ± {est.se[name]:.4f}",
                f"{est.diff[name]:+.4f} ± {est.diff_se[name]:.4f}" if name in est.diff else "",
            ]
            for name, layers in est.layers.items()
        ]
        footer = (
            f"; always predicting the majority class: {est.chance:.4f}"
            if metric == "accuracy"
            else ""
        )
        sections.append(
            "<h2>Is it worth it?</h2>"
            f"<p><b>{html.escape(est.verdict())}</b></p>"
            f'<p class="meta">Probe {metric} cross-validated on {html.escape(est.rows_used())}'
            f"{html.escape(footer)}; a gap counts when it exceeds two paired standard errors.</p>"
            + _table_html(
                ["layer set", "layers", f"{metric} ± SE", "selected − it ± SE"],
                est_rows,
                left=(0, 1),
            )
        )
    if result.warnings:
        sections.append(
            "<p class='meta'>Warnings: "
            + "; ".join(html.escape(w) for w in result.warnings)
            + "</p>"
        )
    if result.steps:
        sections.append(
            "<h2>Why these layers</h2>"
            f"<p class='meta'>{html.escape(result.score_formula())}. Each pick is set against the "
            "runner-up (or the strongest remaining layer by its own probe score); each reason ends "
            "with its weighted share of the difference in total (positive: in favour of the pick).</p>"
            "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in result.explain(probe)) + "</ul>"
        )

    if evaluation is not None:
        rows, classes = [], []
        for r in evaluation.table():
            layers = r["layers"]
            layer_text = (
                " | ".join(",".join(map(str, ls)) for ls in layers)
                if layers and isinstance(layers[0], list)
                else ",".join(map(str, layers))
            )
            rows.append(
                [
                    r["method"],
                    layer_text,
                    r["head"],
                    _fmt(r[evaluation.metric]),
                    _fmt(r["std"]),
                    _fmt(r["selection_time"], 3),
                    _fmt(r["training_time"], 3),
                    _fmt(r["loes_minus_method"], 4),
                    _fmt(r["p_value"], 3),
                ]
            )
            classes.append("loes" if r["method"] == "loes" else "")
        metric = METRIC_LABELS.get(evaluation.metric, evaluation.metric)
        sizes = ", ".join(f"{k} {v}" for k, v in evaluation.n_samples.items())
        sections.append(
            "<h2>LOES against baselines</h2>"
            f'<p class="meta">k = {evaluation.k}; {evaluation.probe} probe; seeds {evaluation.seeds}; '
            f"splits: {html.escape(sizes)}"
            + (
                f"; majority-class accuracy {evaluation.info['majority_accuracy']:.4f}"
                if evaluation.info.get("majority_accuracy") is not None
                else ""
            )
            + ". Selection uses the calibration split only; the probe is "
            "fitted on train, its regularisation chosen on validation, and the test score is reported. "
            + _difference_legend(evaluation.metric)
            + "p the two-sided paired t-test over seeds.</p>"
            + _table_html(
                [
                    "method",
                    "layers",
                    "head",
                    f"test {metric}",
                    "± std",
                    "select s",
                    "train s",
                    "LOES − method ("
                    + ("negative" if evaluation.metric == "rmse" else "positive")
                    + " = LOES better)",
                    "p",
                ],
                rows,
                left=(0, 1, 2),
                row_classes=classes,
            )
        )
        name = figure("comparison.png", lambda p: plot_comparison(evaluation, p))
        if name:
            sections.append(f'<img src="{name}" alt="comparison">')

    name = figure("score_terms.png", lambda p: plot_result(result, p))
    if name:
        sections.append(
            "<h2>Score terms at each step</h2><p class='meta'>Bars: the weighted total "
            "that was minimised (red: the pick); lines: the unweighted terms.</p>"
            f'<img src="{name}" alt="score terms">'
        )
    name = figure("selection_trace.png", lambda p: plot_trace(result, p))
    if name:
        sections.append(f'<h2>Selection trace</h2><img src="{name}" alt="selection trace">')
    if cka is not None or embeddings is not None:
        name = figure(
            "cka.png", lambda p: plot_cka(embeddings, p, cka=cka, selected=result.selected_layers)
        )
        if name:
            sections.append(f'<h2>Layer-by-layer CKA</h2><img src="{name}" alt="CKA heatmap">')
    if evaluation is not None and evaluation.per_layer:
        name = figure(
            "per_layer_probe.png",
            lambda p: plot_per_layer(evaluation, p, selected=result.selected_layers),
        )
        if name:
            sections.append(
                f'<h2>Per-layer probe score</h2><img src="{name}" alt="per-layer probe">'
            )
    for table in result.steps:
        terms = [t for t in result.score_terms() if t.key in table.terms]
        step_rows, classes = [], []
        for row in sorted(result.score_table(table.step), key=lambda r: r["layer"]):
            layer = int(row["layer"])
            step_rows.append(
                [name_of(layer)]
                + ([_fmt(scores.get(layer))] if scores else [])
                + [_fmt(row.get(t.column, float("nan"))) for t in terms]
                + [_fmt(row["total"])]
            )
            classes.append("pick" if layer == table.selected else "")
        headers = (
            ["layer"]
            + ([probe_name] if scores else [])
            + [f"{t.label} ({t.weight_text})" for t in terms]
            + ["total"]
        )
        sections.append(
            f"<h2>Step {table.step} score table (pick: {html.escape(name_of(table.selected))})</h2>"
            f"<p class='meta'>{html.escape(result.score_formula())}</p>"
            + _table_html(headers, step_rows, row_classes=classes)
        )

    opening = ""
    if verdicts:
        opening = (
            '<div class="verdict">'
            + "".join(f"<p><b>{html.escape(text)}</b></p>" for text, _ in verdicts)
            + "".join(
                f'<img src="{html.escape(fig)}" alt="comparison">' for _, fig in verdicts if fig
            )
            + (f'<p class="meta">{note}</p>' if note else "")
            + "</div>"
        )
    doc = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>" + opening + "\n".join(sections) + "</body></html>"
    )
    path = out / "report.html"
    path.write_text(doc, encoding="utf-8")
    logger.info("wrote %s with %d figures", path, len(figures))
    return path
