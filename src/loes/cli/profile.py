"""``loes profile``: every layer-by-layer metric across layers, as a table and a plot."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from loes import _json
from loes._exceptions import LOESError
from loes._io import load_embeddings_file
from loes._validation import closest
from loes.cli._common import (
    check_device,
    check_input_path,
    check_model_folder,
    check_output_file,
    nonnegative_int,
    positive_float,
    positive_int,
)
from loes.hf.profile import profile_model
from loes.metrics import METRICS, profile

__all__ = ["register", "run"]

#: File types ``--plot`` can write (matplotlib's common formats).
PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".eps")

EPILOG = """examples:
  loes profile embeddings.npy --plot profile.png
  loes profile --model ./all-MiniLM-L6-v2 --dataset loes:drugreview \\
      --max-samples 256 --views 2 --plot profile.png --json

  A saved embeddings file (.npy, .npz, .pt or .safetensors, as for
  'loes select --embeddings') of shape (n_samples, n_layers, dim) gives the
  pooled metrics; --model/--dataset streams token states (prompt entropy,
  curvature) and, with --views N, builds N augmented views of each text
  (InfoNCE, LiDAR, DiME). The table goes to stdout (with --json: values,
  directions and best layers as strict JSON); logs go to stderr.
"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``profile`` command; returns its parser."""
    p = subparsers.add_parser(
        "profile",
        help="print and plot every representation metric across layers",
        description="Compute layer-by-layer metrics (entropy, curvature, rank, isotropy, intrinsic "
        "dimension, augmentation invariance, CKA) for every layer.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "embeddings",
        nargs="?",
        default=None,
        help="saved pooled embeddings (.npy/.npz/.pt/.safetensors) of shape (n, layers, dim)",
    )
    p.add_argument(
        "--embeddings-key", default=None, help="entry of the embeddings file holding the features"
    )
    p.add_argument("--model", default=None, help="local model folder or hub id (instead of a file)")
    p.add_argument("--dataset", default=None, help="dataset for --model, e.g. loes:drugreview")
    p.add_argument("--split", default="train")
    p.add_argument("--text-key", default=None, help="text column (default: detected)")
    p.add_argument(
        "--max-samples",
        type=nonnegative_int,
        default=256,
        help="texts to use with --model (default 256; 0 = all)",
    )
    p.add_argument(
        "--views",
        type=nonnegative_int,
        default=0,
        help="augmented views per text with --model (0 or >= 2)",
    )
    p.add_argument(
        "--view-files",
        nargs="+",
        default=None,
        help="saved embeddings of >= 2 augmented views, aligned row by row",
    )
    p.add_argument(
        "--metrics",
        default=None,
        help=f"comma-separated subset of: {','.join(METRICS)} (default: all that apply)",
    )
    p.add_argument(
        "--alpha", type=positive_float, default=1.0, help="Rényi order of the entropies (default 1)"
    )
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--max-length", type=positive_int, default=256)
    p.add_argument("--device", default=None)
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--plot", default=None, help=f"write the plot to this file ({', '.join(PLOT_SUFFIXES)})"
    )
    p.add_argument("--json", action="store_true", help="print the profile as JSON on stdout")
    p.add_argument("--progress", default="auto", choices=["auto", "on", "off"])
    return p


def _metrics(text: str | None) -> list[str] | None:
    if not text:
        return None
    names = [m.strip() for m in text.split(",") if m.strip()]
    for name in names:
        if name not in METRICS:
            close = closest(name, METRICS)
            hint = f"did you mean {close!r}? " if close else ""
            raise LOESError(
                f"--metrics: unknown metric {name!r}; {hint}choose from {','.join(METRICS)}"
            )
    if not names:
        raise LOESError(f"--metrics is empty; choose from {','.join(METRICS)}")
    return names


def _check(args: argparse.Namespace) -> None:
    """Everything cheap, before any file is read or model loaded."""
    if (args.embeddings is None) == (args.model is None):
        raise LOESError("give either an embeddings file or --model/--dataset (not both)")
    if args.model is not None:
        if args.dataset is None:
            raise LOESError("--model needs --dataset, e.g. --dataset loes:drugreview")
        if args.view_files:
            raise LOESError("--view-files go with an embeddings file; with --model use --views N")
        check_device(args.device)
        check_input_path(args.model, "--model", remote="a hub id")
        check_model_folder(args.model, "--model", gguf_file=args.gguf_file)
        check_input_path(args.dataset, "--dataset", remote="a hub id", prefixes=("loes:",))
    else:
        stray = [
            f
            for f, v in (
                ("--dataset", args.dataset),
                ("--views", args.views),
                ("--gguf-file", args.gguf_file),
                ("--device", args.device),
            )
            if v
        ]
        if stray:
            raise LOESError(
                f"{', '.join(stray)} go with --model; drop them with an embeddings file"
            )
    if args.views == 1:
        raise LOESError("--views must be 0 (no view metrics) or at least 2; got 1")
    if args.view_files is not None and len(args.view_files) < 2:
        raise LOESError(
            f"--view-files needs at least 2 files (one per view); got {len(args.view_files)}"
        )


def run(args: argparse.Namespace) -> int:
    """Run ``loes profile``: checks, the profile, then the table or JSON (and the plot)."""
    metrics = _metrics(args.metrics)
    _check(args)
    plot = check_output_file(args.plot, "--plot", suffixes=PLOT_SUFFIXES) if args.plot else None
    show = "off" if args.json else args.progress
    if args.model is not None:
        prof = profile_model(
            args.model,
            args.dataset,
            split=args.split,
            text_key=args.text_key,
            max_samples=args.max_samples or None,
            n_views=args.views,
            metrics=metrics,
            alpha=args.alpha,
            batch_size=args.batch_size,
            max_length=args.max_length,
            device=args.device,
            gguf_file=args.gguf_file,
            random_state=args.seed,
            show_progress=show,
        )
    else:
        embeddings, _ = load_embeddings_file(args.embeddings, key=args.embeddings_key)
        views = [load_embeddings_file(f, key=args.embeddings_key)[0] for f in args.view_files or ()]
        prof = profile(
            embeddings,
            views=views or None,
            metrics=metrics,
            alpha=args.alpha,
            random_state=args.seed,
            show_progress=show,
        )
    best: dict[str, int] = {m: prof.best_layer(m) for m in prof.metrics}
    text = _json.dumps({**prof.to_dict(), "best_layers": best}, indent=2)
    if plot is not None:
        try:
            prof.plot(str(plot))
        except OSError as e:
            sys.stdout.write(text + "\n")  # the values are not lost
            raise LOESError(
                f"could not write the plot {plot} ({e.strerror or e}); the values are on "
                "stdout; choose another --plot path"
            ) from e
    if args.json:
        sys.stdout.write(text + "\n")
        return 0
    lines = [prof.table(), "", "best layer by metric (direction in brackets):"]
    for m, layer in best.items():
        name = prof.layer_names[layer] if prof.layer_names else str(layer)
        lines.append(f"  {m:<16} [{prof.directions[m]:>6}]  layer {layer} ({name})")
    if plot is not None:
        lines.append(f"plot written to {plot}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
