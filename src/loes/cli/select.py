"""``loes select``: pick layers of a Hugging Face model on a dataset, or from
precomputed embeddings, from the shell."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from loes import _json
from loes._exceptions import LOESError
from loes._io import load_embeddings_file, load_targets_file
from loes.cli._common import (
    check_device,
    check_input_path,
    check_model_folder,
    check_output_dir,
    check_output_file,
    finite_float,
    k_value,
    nonnegative_int,
    positive_int,
    write_or_print,
)
from loes.core import select_layers_from_custom_embeddings
from loes.hf import DEFAULT_MAX_SAMPLES, select_layers_from_hf_id
from loes.result import LOESResult
from loes.store import is_store, load_features

__all__ = ["register", "run"]

EPILOG = """examples:
  loes select --model sentence-transformers/all-MiniLM-L6-v2 --dataset ag_news \\
      --split train --k 4 --max-samples 512 --output result.json
  loes select --embeddings feats.npz --k 3 --task regression
  loes select --embeddings feats.npy --targets labels.txt --k 3 --cv loo
  loes select --embeddings feats.pt --targets data.csv --targets-column rating --k 3
  loes select --embeddings cal.npz --eval-embeddings heldout.npz --k auto

  --model takes a hub id or a local folder; --dataset a hub id, a local
  .csv/.tsv/.json/.jsonl/.parquet file, a save_to_disk folder, or a packaged
  set (loes:drugreview, loes:bbc_news). --embeddings instead takes precomputed
  (N, L, D) features: .npy, or .npz/.safetensors/.pt with an 'embeddings'
  entry and, optionally, 'targets' (loes's own cache files qualify); --targets
  gives them from .npy/.npz/.safetensors/.pt, .json (a list), .txt (one value
  per line) or a .csv/.tsv table (the column named label/target/y, or
  --targets-column). --eval-embeddings (with --eval-targets, or targets in
  the file) gives held-out rows of the same layers: the estimate (the
  verdict) is then cross-validated on them instead of on the calibration
  rows. The layer table goes to stdout (or, with --json, the
  result as strict JSON; logs always go to stderr). A user mistake is one
  line on stderr and exit code 2.
"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``select`` command; returns its parser."""
    p = subparsers.add_parser(
        "select",
        help="select the best layers of a Hugging Face model on a dataset (or of precomputed embeddings)",
        description="Extract pooled hidden states of every layer on a calibration sample and run LOES.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=None, help="hub id or local model folder")
    p.add_argument(
        "--dataset",
        default=None,
        help="hub id, local file/folder, or loes:drugreview / loes:bbc_news",
    )
    p.add_argument(
        "--embeddings",
        default=None,
        help="precomputed (N, L, D) features instead of --model/--dataset",
    )
    p.add_argument(
        "--embeddings-key", default=None, help="entry of --embeddings holding the features"
    )
    p.add_argument(
        "--targets",
        default=None,
        help="targets for --embeddings (array file, .json, .txt or a table)",
    )
    p.add_argument(
        "--targets-column",
        default=None,
        help="column of a --targets table (or entry of an array file) holding the targets",
    )
    p.add_argument(
        "--eval-embeddings",
        default=None,
        help="held-out (N_eval, L, D) features of the same layers for the estimate "
        "(default: cross-validate the calibration rows)",
    )
    p.add_argument(
        "--eval-targets",
        default=None,
        help="targets of --eval-embeddings (default: the targets in that file)",
    )
    p.add_argument(
        "--k",
        type=k_value,
        required=True,
        help="number of layers to select, or 'auto' (chosen by a cross-validated probe)",
    )
    p.add_argument("--split", default="train", help="dataset split (default: train)")
    p.add_argument(
        "--config", dest="dataset_config_name", default=None, help="dataset configuration name"
    )
    p.add_argument(
        "--text-key",
        default=None,
        help="input column (default: detected); 'a,b' for sentence pairs",
    )
    p.add_argument("--target-key", default=None, help="target column (default: detected)")
    p.add_argument(
        "--task", default="classification", choices=["classification", "regression", "label_free"]
    )
    p.add_argument("--preset", default="robust", choices=["robust", "reference"])
    for name, text in (
        ("--reg", "ridge strength (default: the preset's)"),
        ("--alpha", "isotropy weight"),
        ("--gamma", "redundancy weight"),
        ("--eta", "class-geometry weight"),
    ):
        p.add_argument(name, type=finite_float, default=None, help=text)
    p.add_argument(
        "--cv",
        default=None,
        choices=["gcv", "loo"],
        help="robust preset: out-of-sample estimate of the fit (default: gcv)",
    )
    p.add_argument(
        "--max-samples",
        type=nonnegative_int,
        default=None,
        help=f"calibration sample cap (default: {DEFAULT_MAX_SAMPLES}; 0 = all rows)",
    )
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument(
        "--max-length",
        type=positive_int,
        default=None,
        help="token truncation length (default: 512 capped at the model's positions)",
    )
    p.add_argument(
        "--pooling",
        default="auto",
        choices=["auto", "cls", "mean", "masked_mean", "max", "last_token"],
    )
    p.add_argument(
        "--include-embeddings", action="store_true", help="keep the embedding output as layer 0"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["auto", "float32", "fp32", "float16", "fp16", "half", "bfloat16", "bf16"],
    )
    p.add_argument("--revision", default=None, help="model revision (branch, tag or commit)")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model to load")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow the model repository's own code"
    )
    p.add_argument(
        "--cache-dir", default=None, help="embedding cache folder ('default' for ~/.cache/loes)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the calibration draw and the selector"
    )
    p.add_argument("--output", "-o", default=None, help="write the result as JSON to this file")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--progress", default="auto", choices=["auto", "on", "off"])
    return p


_MODEL_ONLY = (
    "dataset_config_name",
    "text_key",
    "target_key",
    "max_samples",
    "revision",
    "gguf_file",
    "device",
    "dtype",
    "cache_dir",
)
_EMBEDDINGS_ONLY = (
    "embeddings_key",
    "targets",
    "targets_column",
    "eval_embeddings",
    "eval_targets",
)


def _check_mode(args: argparse.Namespace) -> None:
    """Which of the two modes, with only its own options (cheap; before any work)."""
    flag = {name: "--" + name.replace("_", "-") for name in _MODEL_ONLY + _EMBEDDINGS_ONLY}
    flag["dataset_config_name"] = "--config"
    if args.embeddings is not None:
        if args.model is not None or args.dataset is not None:
            raise LOESError("give either --embeddings or --model with --dataset, not both")
        stray = [flag[n] for n in _MODEL_ONLY if getattr(args, n) is not None]
        if stray:
            raise LOESError(
                f"{', '.join(stray)} apply to --model/--dataset only; drop them with --embeddings"
            )
        return
    if args.model is None or args.dataset is None:
        missing = "--dataset" if args.model is not None else "--model"
        raise LOESError(
            f"missing {missing}: give --model and --dataset (or --embeddings with precomputed features)"
        )
    stray = [flag[n] for n in _EMBEDDINGS_ONLY if getattr(args, n) is not None]
    if stray:
        raise LOESError(
            f"{', '.join(stray)} apply to --embeddings only; the targets come from --dataset"
        )
    check_device(args.device)
    check_input_path(args.model, "--model", remote="a hub id")
    check_model_folder(args.model, "--model", gguf_file=args.gguf_file)
    check_input_path(args.dataset, "--dataset", remote="a hub id", prefixes=("loes:",))
    if args.cache_dir not in (None, "default"):
        check_output_dir(args.cache_dir, "--cache-dir")


def run(args: argparse.Namespace) -> int:
    """Run ``loes select``: checks, selection, then the table or JSON."""
    _check_mode(args)
    output = check_output_file(args.output, "--output") if args.output else None
    if args.embeddings is not None:
        result = _select_embeddings(args)
    else:
        result = _select_model(args)
    text = _json.dumps(result.to_dict(), indent=2)
    written = write_or_print(text, output, "select") if output is not None else True
    if not written:
        return 2
    if args.json:
        sys.stdout.write(text + "\n")
    else:
        sys.stdout.write(result.summary() + "\n")
        if output is not None:
            sys.stdout.write(f"result written to {output}\n")
    return 0


def _method_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The selector's hyper-parameters given on the command line (unset ones omitted)."""
    out = {name: getattr(args, name) for name in ("reg", "alpha", "gamma", "eta", "cv")}
    return {name: value for name, value in out.items() if value is not None}


def _common_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        k=args.k,
        task=args.task,
        preset=args.preset,
        random_state=args.seed,
        show_progress="off" if args.json else args.progress,
        verbose=bool(getattr(args, "verbose", False)),
        **_method_kwargs(args),
    )


def _select_embeddings(args: argparse.Namespace) -> LOESResult:
    embeddings, targets = load_embeddings_file(args.embeddings, key=args.embeddings_key)
    if args.targets is not None:
        targets = load_targets_file(args.targets, column=args.targets_column)
    elif args.targets_column is not None:
        targets = load_targets_file(args.embeddings, column=args.targets_column)
    if targets is None and args.task != "label_free":
        raise LOESError(f"{args.embeddings} holds no targets: pass --targets, or --task label_free")
    held_out = {}
    if args.eval_embeddings is not None:
        eval_embeddings, eval_targets = load_embeddings_file(
            args.eval_embeddings, key=args.embeddings_key
        )
        if args.eval_targets is not None:
            eval_targets = load_targets_file(args.eval_targets, column=args.targets_column)
        if eval_targets is None:
            raise LOESError(f"{args.eval_embeddings} holds no targets: pass --eval-targets")
        held_out = {"eval_embeddings": eval_embeddings, "eval_targets": eval_targets}
    elif args.eval_targets is not None:
        raise LOESError("--eval-targets needs --eval-embeddings (the held-out features)")
    names = {}
    if is_store(args.embeddings):  # index j is the store's j-th layer: name it by the model's name
        names["layer_names"] = load_features(args.embeddings).stored_names
    return select_layers_from_custom_embeddings(
        embeddings,
        targets,
        dataset=str(args.embeddings),
        **names,
        **held_out,
        **_common_kwargs(args),
    )


def _select_model(args: argparse.Namespace) -> LOESResult:
    text_key = args.text_key
    if text_key and "," in text_key:
        text_key = tuple(part.strip() for part in text_key.split(","))
    max_samples = DEFAULT_MAX_SAMPLES if args.max_samples is None else (args.max_samples or None)
    return select_layers_from_hf_id(
        args.model,
        args.dataset,
        split=args.split,
        dataset_config_name=args.dataset_config_name,
        text_key=text_key,
        target_key=args.target_key,
        max_calibration_samples=max_samples,
        batch_size=args.batch_size,
        max_length=args.max_length,
        pooling=args.pooling,
        include_embeddings=args.include_embeddings,
        device=args.device,
        dtype=args.dtype,
        revision=args.revision,
        gguf_file=args.gguf_file,
        trust_remote_code=args.trust_remote_code,
        cache_dir=True if args.cache_dir == "default" else args.cache_dir,
        **_common_kwargs(args),
    )
