"""Held-out accuracy of LOES against the baselines on the offline assets.

Runs the evaluation protocol of :func:`loes.evaluate.evaluate` (calibration /
train / validation / test splits, several seeds, ridge probes) on real models
and data that install from packages, and prints one table per task plus a
summary. Features are extracted once and cached.

    python benchmarks/bench_transfer.py                      # all three tasks
    python benchmarks/bench_transfer.py --tasks minilm-drug --seeds 5 --k 3 4
    python benchmarks/bench_transfer.py --sweep              # LOES settings grid (evidence for defaults)

Tasks: ``minilm-drug`` (all-MiniLM-L6-v2 x drug-review 3-way rating, 979
texts), ``minilm-bbc`` (x BBC News topics, 1000 texts, 200 per topic),
``smollm-drug`` (SmolLM2-135M-Instruct GGUF x drug-review rating). All use
masked-mean pooling and ``max_length`` 128.

On a shared or busy machine set ``OMP_NUM_THREADS=1``: thread oversubscription
can make small dense solves 50x slower.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Any

import numpy as np

TASKS = {
    "minilm-drug": {"model": "minilm", "data": "drugreview", "n": 979},
    "minilm-bbc": {"model": "minilm", "data": "bbc", "n": 1000},
    "smollm-drug": {"model": "smollm2", "data": "drugreview", "n": 979},
}


def features(task: str, cache_dir: str, max_length: int = 128, show_progress: Any = "auto"):
    """(embeddings, targets, layer_names) of a task, cached."""
    from loes import datasets as ld
    from loes.hf import extract_embeddings

    spec = TASKS[task]
    if spec["data"] == "drugreview":
        ds = ld.load_drugreview("all")
    else:
        ds = ld.load_bbc_news(max_per_class=spec["n"] // 5, random_state=0)
    kwargs: dict[str, Any] = {}
    if spec["model"] == "minilm":
        model = ld.minilm_path()
    else:
        model, gguf = ld.smollm2_gguf()
        kwargs["gguf_file"] = gguf
    emb = extract_embeddings(
        model,
        ds,
        task="classification",
        max_samples=min(spec["n"], len(ds)),
        pooling="masked_mean",
        max_length=max_length,
        batch_size=16,
        cache_dir=cache_dir,
        random_state=0,
        show_progress=show_progress,
        **kwargs,
    )
    return emb.embeddings, np.asarray(emb.targets), emb.layer_names


def run_task(task: str, args) -> list[dict[str, Any]]:
    from loes.evaluate import evaluate

    t = time.perf_counter()
    x, y, names = features(task, args.cache_dir, show_progress=args.progress)
    print(
        f"\n## {task}: {x.shape[0]} texts x {x.shape[1]} layers x {x.shape[2]} dims "
        f"(features {time.perf_counter() - t:.1f} s); majority-class rate "
        f"{np.bincount(y).max() / len(y):.3f}",
        flush=True,
    )
    summary = []
    for k in args.k:
        methods = None
        if x.shape[1] > 12 and k > 3:  # exhaustive over C(30, 4) = 27,405 subsets is too slow here
            methods = [
                "loes",
                "last",
                "last_k",
                "all_concat",
                "layer_weights",
                "random_k",
                "greedy_probe",
                "label_free",
            ]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = time.perf_counter()
            ev = evaluate(
                x,
                y,
                k=k,
                seeds=list(range(args.seeds)),
                probe=args.probe,
                methods=methods,
                fractions=args.fractions,
                per_layer=(k == args.k[0]),
                show_progress=args.progress,
            )
        print(
            f"\n### {task}, k={k}, {args.probe} probe, {args.seeds} seeds "
            f"(splits {ev.n_samples}; {time.perf_counter() - t:.0f} s)"
        )
        print(ev.format_table())
        if ev.per_layer:
            print(
                "single-layer test accuracy: "
                + " ".join(
                    f"{i}:{m:.3f}" for i, m in zip(ev.per_layer["layer"], ev.per_layer["mean"])
                )
            )
        summary.append(
            {
                "task": task,
                "k": k,
                "loes": ev.mean_score("loes"),
                "last": ev.mean_score("last"),
                "last_k": ev.mean_score("last_k"),
                "p_last": ev.tests["last"]["p"],
                "p_last_k": ev.tests["last_k"]["p"],
                "best_baseline": max((m for m in ev.methods if m != "loes"), key=ev.mean_score),
            }
        )
        summary[-1]["best_score"] = ev.mean_score(summary[-1]["best_baseline"])
    return summary


def sweep(task: str, args) -> None:
    """Held-out accuracy of LOES (robust) over a grid of its settings."""
    from loes.core.select import DEFAULTS
    from loes.evaluate import evaluate

    x, y, _ = features(task, args.cache_dir, show_progress=args.progress)
    base = DEFAULTS["robust"]
    grid = [{}]
    for reg in (0.01, 1.0, 10.0):
        grid.append({"reg": reg})
    for alpha in (0.0, 1.0):
        grid.append({"alpha": alpha})
    for gamma in (0.0, 0.5):
        grid.append({"gamma": gamma})
    for eta in (0.0, 0.2):
        grid.append({"eta": eta})
    print(f"\n## sweep on {task} (k={args.k[0]}, {args.seeds} seeds); defaults {base}")
    print(f"{'setting':<18} {'acc':>7} {'± std':>7}  layers (seed 0)")
    for opts in grid:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ev = evaluate(
                x,
                y,
                k=args.k[0],
                seeds=list(range(args.seeds)),
                methods=["loes"],
                per_layer=False,
                loes_options=opts,
                show_progress=False,
            )
        scores = ev.scores("loes")
        label = ", ".join(f"{k}={v}" for k, v in opts.items()) or "defaults"
        print(
            f"{label:<18} {np.mean(scores):>7.4f} {np.std(scores, ddof=1):>7.4f}  "
            f"{ev.selection('loes').selected_layers}",
            flush=True,
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--k", nargs="+", type=int, default=[3, 4])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--probe", default="ridge", choices=("ridge", "logistic", "fusion"))
    parser.add_argument(
        "--fractions",
        nargs=4,
        type=float,
        default=[0.25, 0.4, 0.15, 0.2],
        help="calibration / train / validation / test shares",
    )
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/loes-bench"))
    parser.add_argument("--sweep", action="store_true", help="grid over LOES settings instead")
    parser.add_argument("--extract-only", action="store_true")
    parser.add_argument("--json", default=None, help="write the summary rows here")
    parser.add_argument("--progress", default="auto")
    args = parser.parse_args(argv)
    if args.extract_only:
        for task in args.tasks:
            t = time.perf_counter()
            x, _, _ = features(task, args.cache_dir, show_progress=args.progress)
            print(f"{task}: {tuple(x.shape)} in {time.perf_counter() - t:.1f} s", flush=True)
        return 0
    if args.sweep:
        for task in args.tasks:
            sweep(task, args)
        return 0
    from loes.core import DEFAULTS

    print(f"LOES robust defaults: {DEFAULTS['robust']}")
    rows = []
    for task in args.tasks:
        rows.extend(run_task(task, args))
    print("\n## summary (test accuracy, mean over seeds; p: paired t-test)")
    print(
        f"{'task':<12} {'k':>2} {'LOES':>7} {'last':>7} {'p':>6} {'last-k':>7} {'p':>6}  best baseline"
    )
    for r in rows:
        print(
            f"{r['task']:<12} {r['k']:>2} {r['loes']:>7.4f} {r['last']:>7.4f} {r['p_last']:>6.3f} "
            f"{r['last_k']:>7.4f} {r['p_last_k']:>6.3f}  {r['best_baseline']} {r['best_score']:.4f}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
