"""``loes report``: an HTML report (with PNG figures) of a saved selection."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from loes import _json
from loes._exceptions import LOESError
from loes._io import load_embeddings_file, load_json_file
from loes.cli._common import check_output_dir
from loes.evaluate import EvaluationResult
from loes.report import write_report
from loes.result import LOESResult

__all__ = ["register", "run"]

EPILOG = """example:
  loes report result.json --output report/
  loes report loes-demo-output/result.json --evaluation loes-demo-output/evaluation.json \\
      --embeddings features.pt --output report/

  --embeddings takes the same files as 'loes select --embeddings' (.npy, .npz,
  .safetensors, .pt).
"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``report`` command; returns its parser."""
    p = subparsers.add_parser(
        "report",
        help="write an HTML report (with PNG figures) of a saved selection",
        description="Write report.html and PNG figures from a LOESResult JSON file, optionally with "
        "an evaluation (JSON from loes.evaluate) and the embeddings for the CKA heatmap.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("result", help="LOESResult JSON (loes select --output, or a demo's result.json)")
    p.add_argument(
        "--output", "-o", default="loes-report", help="output folder (default: %(default)s)"
    )
    p.add_argument("--evaluation", default=None, help="EvaluationResult JSON (adds the comparison)")
    p.add_argument(
        "--embeddings",
        default=None,
        help="embeddings (n_samples, n_layers, dim) for the CKA heatmap (.npy/.npz/.safetensors/.pt)",
    )
    p.add_argument(
        "--embeddings-key", default=None, help="entry of --embeddings holding the features"
    )
    p.add_argument("--title", default=None, help="report title")
    p.add_argument("--json", action="store_true", help="print the written paths as JSON")
    return p


def _load(cls: Any, path: str) -> Any:
    """A ``LOESResult`` or ``EvaluationResult`` from its JSON file; a wrong file is a LOESError."""
    data = load_json_file(path, cls.__name__)
    if not isinstance(data, dict):
        raise LOESError(
            f"{path}: a {cls.__name__} JSON file holds an object; found a {type(data).__name__}"
        )
    try:
        return cls.from_dict(data)
    except (TypeError, KeyError, ValueError) as e:
        raise LOESError(
            f"{path}: not {cls.__name__} JSON ({type(e).__name__}: {e}); write it with "
            f"{cls.__name__}.to_json(path)"
        ) from e


def run(args: argparse.Namespace) -> int:
    """Run ``loes report``: read and check every input, then write the report."""
    output = check_output_dir(args.output, "--output")
    result = _load(LOESResult, args.result)
    evaluation: EvaluationResult | None = (
        _load(EvaluationResult, args.evaluation) if args.evaluation else None
    )
    embeddings = None
    if args.embeddings is not None:
        embeddings, _ = load_embeddings_file(args.embeddings, key=args.embeddings_key)
        if embeddings.shape[1] != result.num_layers_seen:
            raise LOESError(
                f"{args.embeddings} has {embeddings.shape[1]} layers, the result {args.result} "
                f"{result.num_layers_seen}; give the embeddings the selection was made on"
            )
    path = write_report(
        result, output, embeddings=embeddings, evaluation=evaluation, title=args.title
    )
    figures = sorted(str(p) for p in path.parent.glob("*.png"))
    if args.json:
        sys.stdout.write(_json.dumps({"report": str(path), "figures": figures}) + "\n")
    else:
        sys.stdout.write(f"wrote {path} and {len(figures)} figures\n")
    return 0
