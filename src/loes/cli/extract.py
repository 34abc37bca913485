"""``loes extract``: the features of every row of a dataset to a feature store, in one
process or on Ray workers."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from loes import _json
from loes._exceptions import LOESError
from loes.cli._common import (
    check_device,
    check_input_path,
    check_model_folder,
    check_output_dir,
    positive_float,
    positive_int,
)
from loes.distributed import extract
from loes.hf import export_features
from loes.hf.export import DEFAULT_SHARD_ROWS

__all__ = ["register", "run"]

EPILOG = f"""examples:
  loes extract ./my-model data.parquet --output feats/ --layers 3,7,-1
  loes extract sentence-transformers/all-MiniLM-L6-v2 loes:drugreview --output feats/ \\
      --ray --workers 2                          # a local Ray with 2 CPU workers
  loes extract org/model data.parquet --output /shared/feats --ray --address auto \\
      --gpus-per-worker 1                        # the running Ray cluster, one GPU each
  loes select --embeddings feats/ --k 3          # select layers on the stored features

  MODEL is a hub id or a local folder; DATASET a hub id, a local .csv/.tsv/.json/
  .jsonl/.parquet file, a save_to_disk folder, or loes:drugreview / loes:bbc_news.
  The output folder gets one safetensors file per {DEFAULT_SHARD_ROWS} rows
  (--shard-rows) and a manifest.json written last. Run the same command again after
  an interruption: finished shards are kept. Other settings on an existing store are
  refused unless --overwrite. With --ray every node of the cluster must read DATASET
  and write the output folder. A user mistake is one line on stderr and exit code 2.
"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``extract`` command; returns its parser."""
    p = subparsers.add_parser(
        "extract",
        help="write the pooled layer features of every row of a dataset to a feature store",
        description="Extract pooled hidden states of the chosen layers for every row of a "
        "dataset, shard by shard (resumable), in one process or on Ray workers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="hub id or local model folder")
    p.add_argument("dataset", help="hub id, local file/folder, or loes:drugreview / loes:bbc_news")
    p.add_argument("--output", "-o", required=True, help="the feature store's folder")
    p.add_argument(
        "--layers", default=None, help="layers to keep: 3,7,-1 / middle / last / all (default)"
    )
    p.add_argument(
        "--pooling",
        default="auto",
        choices=["auto", "cls", "mean", "masked_mean", "max", "last_token"],
    )
    p.add_argument(
        "--max-length",
        type=positive_int,
        default=None,
        help="token truncation length (default: 512 capped at the model's positions)",
    )
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument(
        "--shard-rows",
        type=positive_int,
        default=DEFAULT_SHARD_ROWS,
        help=f"rows per shard file (default: {DEFAULT_SHARD_ROWS})",
    )
    p.add_argument("--split", default="train", help="dataset split (default: train)")
    p.add_argument(
        "--config", dest="dataset_config_name", default=None, help="dataset configuration name"
    )
    p.add_argument("--text-key", default=None, help="input column; 'a,b' for sentence pairs")
    p.add_argument("--target-key", default=None, help="target column stored beside the features")
    p.add_argument(
        "--include-embeddings", action="store_true", help="keep the embedding output as layer 0"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (one process only)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["auto", "float32", "fp32", "float16", "fp16", "half", "bfloat16", "bf16"],
    )
    p.add_argument(
        "--storage-dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="dtype of the stored features",
    )
    p.add_argument("--revision", default=None, help="model revision (branch, tag or commit)")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow the model repository's own code"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a store written with other settings"
    )
    p.add_argument("--ray", action="store_true", help="compute the shards on Ray workers")
    p.add_argument(
        "--address", default=None, help="with --ray: the cluster (auto, ray://host:10001)"
    )
    p.add_argument(
        "--workers", type=positive_int, default=None, help="with --ray: actors (default: all)"
    )
    p.add_argument(
        "--gpus-per-worker",
        type=positive_float,
        default=None,
        help="with --ray: GPUs per actor (default: CPU workers)",
    )
    p.add_argument(
        "--cpus-per-worker", type=positive_int, default=None, help="with --ray: CPUs per actor"
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("--progress", default="auto", choices=["auto", "on", "off"])
    return p


_RAY_ONLY = ("address", "workers", "gpus_per_worker", "cpus_per_worker")


def _check(args: argparse.Namespace) -> None:
    """Cheap checks, before any file is read or model loaded."""
    if not args.ray:
        stray = [f"--{n.replace('_', '-')}" for n in _RAY_ONLY if getattr(args, n) is not None]
        if stray:
            raise LOESError(f"{', '.join(stray)} apply with --ray only; add --ray or drop them")
    elif args.device is not None:
        raise LOESError("--device applies without --ray; Ray workers use --gpus-per-worker")
    check_device(args.device)
    check_input_path(args.model, "model", remote="a hub id")
    check_model_folder(args.model, "model")
    check_input_path(args.dataset, "dataset", remote="a hub id", prefixes=("loes:",))
    check_output_dir(args.output, "--output")


def run(args: argparse.Namespace) -> int:
    """Run ``loes extract``: checks, the export, then a summary."""
    _check(args)
    text_key = args.text_key
    if text_key and "," in text_key:
        text_key = tuple(part.strip() for part in text_key.split(","))
    common = dict(
        layers=args.layers,
        pooling=args.pooling,
        text_key=text_key,
        target_key=args.target_key,
        split=args.split,
        dataset_config_name=args.dataset_config_name,
        max_length=args.max_length,
        batch_size=args.batch_size,
        shard_rows=args.shard_rows,
        dtype=args.dtype,
        storage_dtype=args.storage_dtype,
        include_embeddings=args.include_embeddings,
        overwrite=args.overwrite,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        show_progress="off" if args.json else args.progress,
        verbose=bool(getattr(args, "verbose", False)),
    )
    if args.ray:
        store = extract(
            args.model,
            args.dataset,
            args.output,
            num_workers=args.workers,
            num_gpus_per_worker=args.gpus_per_worker or 0,
            num_cpus_per_worker=args.cpus_per_worker or 1,
            address=args.address,
            **common,
        )
    else:
        store = export_features(args.model, args.dataset, args.output, device=args.device, **common)
    summary = {
        "path": str(store.path),
        "rows": len(store),
        "layers": store.layers,
        "layer_names": [store.layer_names[i] for i in store.layers] if store.layer_names else None,
        "widths": store.widths,
        "shards": len(store.manifest["shards"]),
        "computed": store.info.get("computed"),
        "pooling": store.info.get("pooling"),
    }
    if args.json:
        sys.stdout.write(_json.dumps(summary, indent=2) + "\n")
    else:
        sys.stdout.write(
            f"{summary['rows']} rows x layers {', '.join(store.labels)} (widths "
            f"{sorted(set(store.widths))}) in {summary['shards']} shards at {summary['path']}; "
            f"computed {len(summary['computed'] or [])} now\n"
        )
    return 0
