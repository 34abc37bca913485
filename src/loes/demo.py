"""The main job: ``loes demo`` runs LOES end to end, offline, on real data.

1. load a real labelled data set from an installed package (drug-review
   3-way rating, or BBC News topics);
2. extract the pooled features of every layer of a real small model
   (all-MiniLM-L6-v2, packaged) — cached under the output folder;
3. run the evaluation protocol (:func:`loes.evaluate.evaluate`): LOES
   (``preset="robust"``) and every baseline select layers on a calibration
   split, probes are trained on the train split, tuned on validation and
   scored on test, over several seeds;
4. print the comparison table and write ``report.html`` (with PNG figures),
   ``result.json`` (LOES's selection) and ``evaluation.json``.

Run ``loes demo`` (:mod:`loes.cli.demo`); ``--quick`` uses a small subset.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from loes._exceptions import LOESError
from loes._progress import ProgressSetting
from loes.datasets import load_bbc_news, load_drugreview, minilm_path
from loes.evaluate import evaluate
from loes.hf import extract_embeddings
from loes.report import write_report

__all__ = ["DEMO_TASKS", "DemoOutput", "run_demo"]

logger = logging.getLogger(__name__)

#: Demo tasks: loader name, samples used (full / quick) and a description.
DEMO_TASKS: Dict[str, Dict[str, Any]] = {
    "drugreview": {"samples": 979, "quick": 240, "label": "drug-review rating (negative / neutral / positive)"},
    "bbc": {"samples": 1000, "quick": 250, "label": "BBC News topic (5 classes)"},
}


@dataclass
class DemoOutput:
    """What :func:`run_demo` produced.

    Attributes
    ----------
    evaluation : loes.evaluate.EvaluationResult
    result : LOESResult
        LOES's selection on the first seed's calibration split.
    paths : dict of str to pathlib.Path
        ``report``, ``result``, ``evaluation`` and the PNG figures.
    timings : dict of str to float
        Seconds per phase (``load``, ``extract``, ``evaluate``, ``report``, ``total``).
    """

    evaluation: Any
    result: Any
    paths: Dict[str, Path] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)


def _load_texts(task: str, n: int, seed: int):
    if task == "drugreview":
        ds = load_drugreview("all")
    elif task == "bbc":
        # a balanced draw: n / 5 articles per topic
        ds = load_bbc_news(max_per_class=max(2, n // 5), random_state=seed)
    else:
        raise LOESError(f"task must be one of {sorted(DEMO_TASKS)}; got {task!r}")
    return ds


def run_demo(
    output: str = "loes-demo-output",
    *,
    task: str = "drugreview",
    k: int = 3,
    seeds: int = 3,
    quick: bool = False,
    max_samples: Optional[int] = None,
    max_length: Optional[int] = None,
    probe: str = "ridge",
    model: Optional[str] = None,
    show_progress: ProgressSetting = "auto",
    echo: Callable[[str], None] = print,
) -> DemoOutput:
    """Run the offline demo end to end and write its report.

    Parameters
    ----------
    output : str
        Output folder (created); the feature cache lives in ``output/cache``.
    task : {"drugreview", "bbc"}
    k : int
        Layers LOES and the k-layer baselines select.
    seeds : int
        Number of seeds (splits) of the evaluation.
    quick : bool
        A small subset and shorter texts (for tests and a first look).
    max_samples, max_length : int, optional
        Override the number of texts and the token limit.
    probe : {"ridge", "logistic", "fusion"}
    model : str, optional
        A local model folder (default: the packaged all-MiniLM-L6-v2).
    show_progress : bool or str
    echo : callable
        Where the printed lines go (``print`` by default).

    Returns
    -------
    DemoOutput
    """
    if task not in DEMO_TASKS:
        raise LOESError(f"task must be one of {sorted(DEMO_TASKS)}; got {task!r}")
    if seeds < 1:
        raise LOESError(f"seeds must be at least 1; got {seeds}")
    t0 = time.perf_counter()
    timings: Dict[str, float] = {}
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    spec = DEMO_TASKS[task]
    n = max_samples or (spec["quick"] if quick else spec["samples"])
    max_length = max_length or (64 if quick else 128)
    model_path = model or minilm_path()
    model_label = "all-MiniLM-L6-v2 (packaged)" if model is None else str(model)

    echo(f"loes demo: {model_label} on the {spec['label']}")
    ds = _load_texts(task, n, seed=0)
    timings["load"] = time.perf_counter() - t0
    t = time.perf_counter()
    emb = extract_embeddings(
        model_path, ds, task="classification", max_samples=min(n, len(ds)), pooling="masked_mean",
        max_length=max_length, batch_size=32, cache_dir=out / "cache", random_state=0,
        show_progress=show_progress,
    )
    timings["extract"] = time.perf_counter() - t
    x, y = emb.embeddings, emb.targets
    source = "from cache" if emb.from_cache else f"{timings['extract']:.1f} s"
    echo(f"features: {x.shape[0]} texts x {x.shape[1]} layers x {x.shape[2]} dims, masked-mean pooled, "
         f"max_length {max_length} ({source})")

    t = time.perf_counter()
    # the evaluation is many small dense solves: one thread is as fast on an idle
    # machine and far faster on a busy one (no OpenMP oversubscription)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ev = evaluate(
            x, y, k=k, task="classification", seeds=list(range(seeds)), probe=probe,
            loes_options={"layer_names": emb.layer_names, "model_name": model_label,
                          "dataset": task, "pooling": emb.pooling},
            layer_names=emb.layer_names, show_progress=show_progress,
        )
    finally:
        torch.set_num_threads(threads)
    timings["evaluate"] = time.perf_counter() - t
    sizes = ", ".join(f"{name} {size}" for name, size in ev.n_samples.items())
    echo(f"\nLOES (robust, k={k}) vs baselines: {probe} probe, {seeds} seed(s), splits: {sizes}")
    echo(ev.format_table())
    best_other = max((m for m in ev.methods if m != "loes"), key=ev.mean_score)
    echo(f"\nLOES: test accuracy {ev.mean_score('loes'):.4f} with layers "
         f"{ev.selection('loes').selected_layers} (seed 0); last layer {ev.mean_score('last'):.4f}; "
         f"best baseline: {best_other} {ev.mean_score(best_other):.4f}")

    t = time.perf_counter()
    result = ev.selection("loes")
    paths: Dict[str, Path] = {}
    paths["result"] = out / "result.json"  # LOES's selection on seed 0's calibration split
    result.to_json(str(paths["result"]))
    paths["evaluation"] = out / "evaluation.json"
    ev.to_json(str(paths["evaluation"]))
    paths["report"] = write_report(result, out, embeddings=x, evaluation=ev,
                                   title=f"LOES demo — {model_label}, {spec['label']}")
    for png in sorted(out.glob("*.png")):
        paths[png.stem] = png
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    echo(f"\nwrote {paths['report']} (+ {len([p for p in paths if p not in ('report', 'result', 'evaluation')])} "
         f"figures), {paths['result'].name}, {paths['evaluation'].name} in {out} "
         f"[{timings['total']:.0f} s]")
    return DemoOutput(evaluation=ev, result=result, paths=paths, timings=timings)
