"""``loes demo`` and ``loes report``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from loes._exceptions import LOESError

__all__ = ["register"]

_DEMO_EPILOG = """example:
  loes demo                         # MiniLM-L6 on the drug-review rating, 3 seeds, ~3 min on 2 cores
  loes demo --task bbc --k 4 --output bbc-demo
  loes demo --quick                 # small subset, under a minute
"""

_REPORT_EPILOG = """example:
  loes report result.json --output report/
  loes report loes-demo-output/result.json --evaluation loes-demo-output/evaluation.json \\
      --embeddings features.pt --output report/
"""


def register(subparsers: Any) -> None:
    """Add the ``demo`` and ``report`` commands."""
    from loes.demo import add_arguments, run_from_args

    demo = subparsers.add_parser(
        "demo", help="run LOES end to end offline on a packaged model and data set",
        description="Extract every layer of the packaged all-MiniLM-L6-v2 on real labelled data, "
                    "select layers with LOES and the baselines, train probes, print the comparison "
                    "and write an HTML report.",
        epilog=_DEMO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(demo)
    demo.set_defaults(func=run_from_args)

    report = subparsers.add_parser(
        "report", help="write an HTML report (with PNG figures) of a saved selection",
        description="Write report.html and PNG figures from a LOESResult JSON file, optionally with "
                    "an evaluation (JSON from loes.evaluate) and the embeddings for the CKA heatmap.",
        epilog=_REPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument("result", help="LOESResult JSON (result.to_json(path), or a demo's result.json)")
    report.add_argument("--output", "-o", default="loes-report", help="output folder (default: %(default)s)")
    report.add_argument("--evaluation", default=None, help="EvaluationResult JSON (adds the comparison)")
    report.add_argument("--embeddings", default=None,
                        help="embeddings (.pt tensor or .npy array, (n_samples, n_layers, dim)) for the CKA heatmap")
    report.add_argument("--title", default=None, help="report title")
    report.add_argument("--json", action="store_true", help="print the written paths as JSON")
    report.set_defaults(func=_run_report)


def _load_embeddings(path: str):
    if path.endswith(".npy"):
        import numpy as np

        return np.load(path)
    if path.endswith((".pt", ".pth")):
        import torch

        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            obj = obj.get("embeddings", obj)
        return obj
    raise LOESError(f"--embeddings must be a .npy or .pt file; got {path!r}")


def _run_report(args: argparse.Namespace) -> int:
    from loes.evaluate import EvaluationResult
    from loes.report import write_report
    from loes.result import LOESResult

    result = LOESResult.from_json(args.result)
    evaluation = EvaluationResult.from_json(args.evaluation) if args.evaluation else None
    embeddings = _load_embeddings(args.embeddings) if args.embeddings else None
    path = write_report(result, args.output, embeddings=embeddings, evaluation=evaluation, title=args.title)
    figures = sorted(str(p) for p in path.parent.glob("*.png"))
    if args.json:
        print(json.dumps({"report": str(path), "figures": figures}))
    else:
        print(f"wrote {path} and {len(figures)} figures", file=sys.stdout)
    return 0
