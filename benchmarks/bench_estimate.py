"""What ``result.estimate`` (and ``k="auto"``) cost next to the selection itself.

Random features with a planted signal (a middle layer and the last layer carry
the classes or the regression target), one torch thread (``OMP_NUM_THREADS=1``,
set here for every child process). Each shape runs in a fresh process per
version of the code, so versions compared in one run share the machine's state:

    OMP_NUM_THREADS=1 python benchmarks/bench_estimate.py
    OMP_NUM_THREADS=1 python benchmarks/bench_estimate.py --src before=/path/to/old/src --src after=src

Times are CPU seconds of the process (``time.process_time``, one thread), so
other tenants of a shared machine do not inflate them; median of ``--repeats``.
Columns: the selection at k=3 without the estimate (``estimate=False``), the
estimate (a k=3 ``estimate=True`` run minus that: the cross-validated probe on
the picks, the last layer, last-k and all layers), their ratio, and a whole
``k="auto"`` run (the LOES order to 8 layers, the prefixes' cross-validation,
the choice and the estimate).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SHAPES = (  # (N, L, D, task, classes)
    (1000, 13, 384, "classification", 4),
    (1000, 13, 384, "regression", 0),
    (1000, 30, 576, "classification", 3),
    (2000, 25, 1024, "classification", 5),
)

CHILD = r"""
import json, statistics, sys, time
import torch
from loes import select_layers_from_custom_embeddings as select

n, n_layers, dim, task, classes, repeats = json.loads(sys.argv[1])
g = torch.Generator().manual_seed(0)
x = torch.randn(n, n_layers, dim, generator=g)
if task == "classification":
    y = torch.arange(n) % classes
    onehot = torch.nn.functional.one_hot(y, classes).float()
    x[:, n_layers // 2, :classes] += 1.0 * onehot
    x[:, -1, :classes] += 0.6 * onehot
else:
    y = x[:, n_layers // 2, :5].sum(1) + x[:, -1, 5:8].sum(1) + 2 * torch.randn(n, generator=g)
kw = dict(task=task, show_progress=False)
select(x[:200], y[:200], k=2, **kw)  # warm-up: imports, first-touch


def cpu(**options):
    times = []
    for _ in range(repeats):
        start = time.process_time()
        select(x, y, **options, **kw)
        times.append(time.process_time() - start)
    return statistics.median(times)


sel = cpu(k=3, estimate=False)
with_estimate = cpu(k=3)
auto = cpu(k="auto")
print(json.dumps({"selection": sel, "estimate": with_estimate - sel, "auto": auto}))
"""


def run_one(src: str, args: list) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(src).resolve()), OMP_NUM_THREADS="1")
    env["MKL_NUM_THREADS"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    here = Path(__file__).resolve().parent.parent / "src"
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--src",
        action="append",
        default=None,
        metavar="NAME=PATH",
        help=f"a version of loes to time (repeatable; default: this checkout, {here})",
    )
    p.add_argument("--repeats", type=int, default=1, help="runs per measurement (median)")
    p.add_argument("--quick", action="store_true", help="only the N=1000 shapes")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    versions = dict(s.split("=", 1) for s in (args.src or [f"this={here}"]))
    rows = []
    print(
        f"{'N x L x D':<14} {'task':<14} {'version':<8} {'selection':>9} {'estimate':>9} "
        f"{'est/sel':>7} {'k=auto':>8}"
    )
    for n, n_layers, dim, task, classes in SHAPES:
        if args.quick and n > 1000:
            continue
        for name, src in versions.items():
            t = run_one(src, [n, n_layers, dim, task, classes, args.repeats])
            row = dict(shape=f"{n}x{n_layers}x{dim}", task=task, version=name, **t)
            rows.append(row)
            print(
                f"{row['shape']:<14} {task:<14} {name:<8} {t['selection']:>8.2f}s "
                f"{t['estimate']:>8.2f}s {t['estimate'] / t['selection']:>6.1f}x {t['auto']:>7.2f}s",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
