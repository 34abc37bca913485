"""Quality benchmark: held-out probe score of each layer-selection method vs oracles.

For each case (a cached feature set and one of its targets) and each of
``--splits`` stratified re-splits (calibration 20 % / train 50 % / test 30 %),
every method picks layers from the calibration rows only, a probe is trained
on the picked layers (train rows) and scored on the test rows: accuracy of a
logistic probe for classification, R^2 of a ridge probe for regression, both in
points (x100). The protocol, probe and oracles are in ``_quality.py``; a new
method is one line in ``_quality.SELECTORS``.

    python benchmarks/quality_features.py            # once: extract and cache the features
    python benchmarks/bench_quality.py               # every case, 5 splits, k=3
    python benchmarks/bench_quality.py --cases minilm_drug_rating --splits 2 --quick
    python benchmarks/bench_quality.py --json out.json --jobs 2

Prints one table (methods x cases, mean over cases, mean regret to the oracle
k-subset), per-case facts (which single layer is best, how far the last layer
is from it) and paired wins/ties/losses of ``loes`` against every method over
case x split (tie: |difference| < 0.5 point). The JSON has every per-split number.
Each case-split is cached under ``benchmarks/.cache/results/`` keyed by
``_quality.PROTOCOL``, the feature file and the settings, so a rerun only
computes what changed (``--fresh`` recomputes everything).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _quality as Q  # noqa: E402
import quality_features as F  # noqa: E402

#: case -> (feature set, target[, rows]). Targets: integers = classification, floats =
#: regression; rows: a stratified subsample (seed 0) of that many rows.
CASES = {
    "minilm_drug_rating": ("minilm_drug", "rating"),
    "minilm_bbc_topic": ("minilm_bbc", "topic"),
    "smollm_drug_rating": ("smollm_drug", "rating"),
    "smollm_bbc_topic": ("smollm_bbc", "topic"),
    "effnet_mnist_digit": ("effnet_mnist", "digit", 1000),
    "minilm_drug_useful": ("minilm_drug", "useful"),
    "minilm_bbc_loglen": ("minilm_bbc", "loglen"),
}
ORDER = [
    "last",
    "last_k",
    "all",
    "random_k",
    "best_single_cv",
    "greedy_probe",
    "loes_k1",
    "loes_k2",
    "loes",
    "loes_k4",
    "loes_auto",
    "loes_ref",
    "oracle_single",
    "oracle_k_top1",
    "oracle_k",
]
MAIN = "loes"
TIE = 0.5  # points
QUICK_ROWS = 400

_DATA: dict = {}


def _case_data(case: str, quick: bool):
    if case not in _DATA:
        fset, target, *cap = CASES[case]
        layers, targets, meta = F.load_set(fset)
        y = targets[target]
        n = min([len(y), *cap] + ([QUICK_ROWS] if quick else []))
        if n < len(y):
            strata = (
                y
                if Q.task_of(y) == "classification"
                else np.digitize(y, np.quantile(y, [0.2, 0.4, 0.6, 0.8]))
            )
            rows = F.stratified_subsample(strata, n, seed=0)
            layers, y = [x[rows] for x in layers], y[rows]
        _DATA[case] = (layers, y, meta)
    return _DATA[case]


def _result_path(case, seed, k, quick) -> Path:
    """Cache file of one case-split: keyed by the protocol version, the features and the
    settings (not the methods: a method missing from a cached split is added to it)."""
    fset = CASES[case][0]
    h = hashlib.sha256(Q.PROTOCOL.encode())
    h.update(
        repr(
            (case, seed, k, quick, os.path.getmtime(F.CACHE / f"{fset}.safetensors"))
            + CASES[case][2:]
        ).encode()
    )
    return F.CACHE / "results" / f"{case}_s{seed}_k{k}_{h.hexdigest()[:12]}.json"


def _run(job):
    case, seed, k, methods, quick, reuse, redo = job
    path = _result_path(case, seed, k, quick)
    if reuse and path.exists():
        out = json.loads(path.read_text())
        for m in redo:  # the library changed under this method: recompute it alone
            out["layers"].pop(m, None)
        if all(m in out["layers"] for m in methods):
            return case, {**out, "reused": True}
        layers, y, _ = _case_data(case, quick)
        out = Q.add_methods(layers, y, seed, k, out, methods)
        path.write_text(json.dumps(out, default=float))
        return case, {**out, "reused": True}
    layers, y, _ = _case_data(case, quick)
    t0 = time.perf_counter()
    out = Q.run_split(layers, y, seed, k, methods)
    out["seconds"] = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, default=float))
    return case, out


def summarise(results: dict, methods: list) -> dict:
    """Case means (points), overall mean, mean regret and paired W/T/L of MAIN.

    Parameters
    ----------
    results : dict case -> list of run_split outputs
    methods : column order
    """
    means = {
        m: {c: 100 * np.mean([s["scores"][m] for s in splits]) for c, splits in results.items()}
        for m in methods
    }
    overall = {m: float(np.mean(list(v.values()))) for m, v in means.items()}
    regret = {
        m: float(
            np.mean(
                [
                    100 * (s["scores"]["oracle_k"] - s["scores"][m])
                    for splits in results.values()
                    for s in splits
                ]
            )
        )
        for m in methods
    }
    wtl = {}
    if MAIN in methods:
        for m in methods:
            d = np.array(
                [
                    100 * (s["scores"][MAIN] - s["scores"][m])
                    for splits in results.values()
                    for s in splits
                ]
            )
            wtl[m] = [int(np.sum(d >= TIE)), int(np.sum(np.abs(d) < TIE)), int(np.sum(d <= -TIE))]
    facts = {}
    for c, splits in results.items():
        single = np.array([s["single"] for s in splits])
        facts[c] = {
            "n_layers": single.shape[1],
            "best_single_layer": int(np.argmax(single.mean(0))),
            "last_gap_points": float(100 * np.mean(single.max(1) - single[:, -1])),
            "mean_single_points": [round(100 * v, 2) for v in single.mean(0)],
            "oracle_search": splits[0]["oracle"]["search"],
            "seconds": float(sum(s["seconds"] for s in splits)),
        }
    return {"means": means, "overall": overall, "regret": regret, "wtl": wtl, "facts": facts}


def format_table(summary: dict, methods: list, k: int) -> str:
    cases = list(summary["facts"])
    short = [
        c.replace("_", " ")
        .replace("minilm", "mini")
        .replace("smollm", "smol")
        .replace("effnet", "eff")[:12]
        for c in cases
    ]
    head = f"{'method':<15}" + "".join(f"{s:>13}" for s in short) + f"{'mean':>8}{'regret':>8}"
    lines = [head]
    for m in methods:
        row = "".join(f"{summary['means'][m][c]:13.1f}" for c in cases)
        lines.append(f"{m:<15}{row}{summary['overall'][m]:8.1f}{summary['regret'][m]:8.1f}")
    lines.append("")
    lines.append(
        f"{'best 1 layer':<15}"
        + "".join(
            f"{summary['facts'][c]['best_single_layer']:>9}/{summary['facts'][c]['n_layers']:<3}"
            for c in cases
        )
    )
    lines.append(
        f"{'last: -pts':<15}"
        + "".join(f"{summary['facts'][c]['last_gap_points']:13.1f}" for c in cases)
    )
    if summary["wtl"]:
        lines.append("")
        lines.append(
            f"{MAIN} (k={k}) vs each method, wins/ties/losses over case x split "
            f"(tie: |diff| < {TIE} point):"
        )
        lines.append(
            "  "
            + ", ".join(
                f"{m} {w}/{t}/{lo}" for m, (w, t, lo) in summary["wtl"].items() if m != MAIN
            )
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="run these split seeds only (default: 0 .. splits-1)"
    )
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument(
        "--methods", nargs="+", default=list(Q.SELECTORS), choices=list(Q.SELECTORS)
    )
    parser.add_argument(
        "--json", default=str(F.CACHE / "bench_quality.json"), help="per-split output"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"at most {QUICK_ROWS} rows per case (stratified) and 2 splits",
    )
    parser.add_argument("--jobs", type=int, default=1, help="worker processes over case x split")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="recompute case-splits already cached (default: reuse those whose "
        "protocol source, features and settings are unchanged)",
    )
    parser.add_argument(
        "--redo",
        nargs="+",
        default=[],
        choices=list(Q.SELECTORS),
        help="recompute these methods in cached splits (after a library change)",
    )
    args = parser.parse_args(argv)
    splits = min(args.splits, 2) if args.quick else args.splits
    cases = []
    for c in args.cases:
        try:
            _case_data(c, args.quick)
            cases.append(c)
        except FileNotFoundError as exc:
            print(f"skipping {c}: {exc}", file=sys.stderr)
    seeds = args.seeds if args.seeds else list(range(splits))
    splits = len(seeds)
    jobs = [
        (c, s, args.k, args.methods, args.quick, not args.fresh, args.redo)
        for c in cases
        for s in seeds
    ]
    t0 = time.perf_counter()
    results: dict = {c: [] for c in cases}
    if args.jobs > 1:
        with Pool(args.jobs) as pool:
            for c, out in pool.imap_unordered(_run, jobs):
                results[c].append(out)
    else:
        for job in jobs:
            c, out = _run(job)
            results[c].append(out)
            note = " (cached)" if out.get("reused") else ""
            print(
                f"  {c} split {out['seed']}: {out['seconds']:.0f} s{note}",
                file=sys.stderr,
                flush=True,
            )
    for c in cases:
        results[c].sort(key=lambda s: s["seed"])
    methods = [m for m in ORDER if m in args.methods or m in Q.REFERENCES] + [
        m for m in args.methods if m not in ORDER
    ]
    summary = summarise(results, methods)
    seconds = time.perf_counter() - t0
    print(
        f"Quality benchmark: k={args.k}, {splits} split(s), probe score on test in points "
        f"(accuracy x100; R^2 x100 for regression), regret = oracle_k - method"
    )
    print(format_table(summary, methods, args.k))
    print(f"\n{len(jobs)} case-splits in {seconds:.0f} s")
    meta = {
        c: {
            **_case_data(c, args.quick)[2],
            "target": CASES[c][1],
            "task": Q.task_of(_case_data(c, args.quick)[1]),
            "n_rows": len(_case_data(c, args.quick)[1]),
        }
        for c in cases
    }
    payload = {
        "config": {
            "k": args.k,
            "splits": splits,
            "quick": args.quick,
            "methods": methods,
            "fractions": Q.FRACTIONS,
            "Cs": Q.CS,
            "oracle_lambdas": Q.ORACLE_LAMBDAS,
            "max_subsets": Q.MAX_SUBSETS,
            "seconds": seconds,
            "threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "cases": {c: {"meta": meta[c], "splits": results[c]} for c in cases},
        "summary": summary,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(payload, indent=1, default=float))
    print(f"per-split results: {args.json}")
    return payload


if __name__ == "__main__":
    main()
