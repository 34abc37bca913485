"""``loes profile``: every layer-by-layer metric across layers, as a table and a plot."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

from loes._exceptions import LOESError

EPILOG = """examples:
  loes profile embeddings.npy --plot profile.png
  loes profile --model ./all-MiniLM-L6-v2 --dataset loes:drugreview \\
      --max-samples 256 --views 2 --plot profile.png --json

  A saved embeddings file (.npy, .pt or .safetensors) of shape
  (n_samples, n_layers, dim) gives the pooled metrics; --model/--dataset
  streams token states (prompt entropy, curvature) and, with --views N,
  builds N augmented views of each text (InfoNCE, LiDAR, DiME). The table
  goes to stdout (with --json: values, directions and best layers as JSON);
  logs go to stderr.
"""


def register(subparsers: Any) -> None:
    from loes.metrics._profile import METRICS

    p = subparsers.add_parser(
        "profile",
        help="print and plot every representation metric across layers",
        description="Compute layer-by-layer metrics (entropy, curvature, rank, isotropy, intrinsic "
                    "dimension, augmentation invariance, CKA) for every layer.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("embeddings", nargs="?", default=None,
                   help="saved pooled embeddings (.npy/.pt/.safetensors) of shape (n, layers, dim)")
    p.add_argument("--model", default=None, help="local model folder or hub id (instead of a file)")
    p.add_argument("--dataset", default=None, help="dataset for --model, e.g. loes:drugreview")
    p.add_argument("--split", default="train")
    p.add_argument("--text-key", default=None, help="text column (default: detected)")
    p.add_argument("--max-samples", type=int, default=256, help="texts to use with --model (default 256)")
    p.add_argument("--views", type=int, default=0, help="augmented views per text with --model (0 or >= 2)")
    p.add_argument("--view-files", nargs="+", default=None,
                   help="saved embeddings of >= 2 augmented views, aligned row by row")
    p.add_argument("--metrics", default=None,
                   help=f"comma-separated subset of: {','.join(METRICS)} (default: all that apply)")
    p.add_argument("--alpha", type=float, default=1.0, help="Rényi order of the entropies (default 1)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--device", default=None)
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="write the plot to this file (PNG, PDF, SVG)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON on stdout")
    p.add_argument("--progress", default="auto", choices=["auto", "on", "off"])
    p.set_defaults(func=run)


def load_array(path: str) -> torch.Tensor:
    """Load (n_samples, n_layers, dim) embeddings from .npy, .pt or .safetensors."""
    if not os.path.exists(path):
        raise LOESError(f"embeddings file not found: {path}")
    ext = path.rsplit(".", 1)[-1].lower()
    if ext == "npy":
        import numpy as np

        return torch.from_numpy(np.load(path))
    if ext in ("pt", "pth"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    elif ext == "safetensors":
        from loes._deps import require

        obj = require("safetensors.torch", extra="hf", package="safetensors").load_file(path)
    else:
        raise LOESError(f"cannot read {path!r}: use a .npy, .pt or .safetensors file")
    if isinstance(obj, dict):
        if "embeddings" in obj:
            obj = obj["embeddings"]
        elif len(obj) == 1:
            obj = next(iter(obj.values()))
        else:
            raise LOESError(f"{path} holds several tensors {sorted(obj)}: name the one to use 'embeddings'")
    if not isinstance(obj, torch.Tensor):
        raise LOESError(f"{path} does not hold a tensor (got {type(obj).__name__})")
    return obj


def run(args: argparse.Namespace) -> int:
    from loes.metrics._profile import profile

    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    show = "off" if args.json else args.progress
    if (args.embeddings is None) == (args.model is None):
        raise LOESError("give either an embeddings file or --model/--dataset (not both)")
    if args.model is not None:
        if args.dataset is None:
            raise LOESError("--model needs --dataset")
        from loes.metrics._hf import profile_model

        prof = profile_model(
            args.model, args.dataset, split=args.split, text_key=args.text_key,
            max_samples=args.max_samples or None, n_views=args.views, metrics=metrics, alpha=args.alpha,
            batch_size=args.batch_size, max_length=args.max_length, device=args.device,
            gguf_file=args.gguf_file, random_state=args.seed, show_progress=show,
        )
    else:
        views = [load_array(f) for f in args.view_files] if args.view_files else None
        prof = profile(load_array(args.embeddings), views=views, metrics=metrics, alpha=args.alpha,
                       random_state=args.seed, show_progress=show)
    best = {m: prof.best_layer(m) for m in prof.metrics}
    if args.plot:
        prof.plot(args.plot)
    if args.json:
        sys.stdout.write(json.dumps({**prof.to_dict(), "best_layers": best}, indent=2) + "\n")
        return 0
    lines = [prof.table(), "", "best layer by metric (direction in brackets):"]
    for m, layer in best.items():
        name = prof.layer_names[layer] if prof.layer_names else str(layer)
        lines.append(f"  {m:<16} [{prof.directions[m]:>6}]  layer {layer} ({name})")
    if args.plot:
        lines.append(f"plot written to {args.plot}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
