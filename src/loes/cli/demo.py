"""``loes demo``: LOES end to end, offline, on a packaged model and data set (:func:`loes.demo.run_demo`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from loes import _json
from loes.cli._common import check_input_path, check_model_folder, check_output_dir, positive_int
from loes.demo import DEMO_TASKS, run_demo

__all__ = ["register", "run"]

EPILOG = """example:
  loes demo                         # MiniLM-L6 on the drug-review rating, 3 seeds, ~3 min on 2 cores
  loes demo --task bbc --k 4 --output bbc-demo
  loes demo --quick                 # small subset, under a minute
"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` command; returns its parser."""
    p = subparsers.add_parser(
        "demo", help="run LOES end to end offline on a packaged model and data set",
        description="Extract every layer of the packaged all-MiniLM-L6-v2 on real labelled data, "
                    "select layers with LOES and the baselines, train probes, print the comparison "
                    "and write an HTML report.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", "-o", default="loes-demo-output", help="output folder (default: %(default)s)")
    p.add_argument("--task", choices=sorted(DEMO_TASKS), default="drugreview",
                   help="drugreview: 3-way rating of drug reviews; bbc: BBC News topics")
    p.add_argument("--k", type=positive_int, default=3, help="layers to select (default: %(default)s)")
    p.add_argument("--seeds", type=positive_int, default=3, help="evaluation seeds (default: %(default)s)")
    p.add_argument("--probe", choices=("ridge", "logistic", "fusion"), default="ridge",
                   help="what is trained on the selected layers (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="small subset, short texts (under a minute)")
    p.add_argument("--max-samples", type=positive_int, default=None, help="number of texts to use")
    p.add_argument("--model", default=None, help="a local model folder (default: packaged MiniLM-L6)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--json", action="store_true", help="print the evaluation as JSON on stdout")
    return p


def run(args: argparse.Namespace) -> int:
    """Run the demo from parsed arguments; returns the exit code."""
    if args.model is not None:
        check_input_path(args.model, "--model")
        check_model_folder(args.model, "--model")
    check_output_dir(args.output, "--output")
    echo = (lambda line: print(line, file=sys.stderr)) if args.json else print
    demo = run_demo(
        args.output, task=args.task, k=args.k, seeds=args.seeds, quick=args.quick,
        max_samples=args.max_samples, probe=args.probe, model=args.model,
        show_progress=False if args.no_progress else "auto", echo=echo,
    )
    if args.json:
        sys.stdout.write(_json.dumps(demo.evaluation.to_dict(), indent=2) + "\n")
    return 0
