"""Distributed feature extraction on Ray Data (``pip install 'loes[ray]'``).

:func:`extract` writes the same feature store as :func:`loes.hf.export_features`
(same shards, same plan, features equal within floating-point tolerance), but
its shards are computed by a pool of Ray actors, each loading the model once
(one GPU each, or CPU threads) and writing its own shards. It runs on whatever
Ray it finds: a local Ray started for the call on a laptop, the cluster of
``ray.init(address=...)`` made before the call, or ``address="ray://..."``
(``"auto"``: the cluster this machine belongs to), with no change of code.

The pipeline::

    ray.data.from_items(pending shard ids)            one block per shard
      .map_batches(_ShardWorker, batch_size=1,        an actor pool: model loaded once
                   compute=ActorPoolStrategy(size=num_workers),
                   num_gpus=num_gpus_per_worker)      per actor; reads its shard's rows,
                                                      extracts, writes the shard
    driver: FeatureWriter.finish (the manifest)

On a cluster, the workers read the dataset themselves when it is named by a
path or hub id that every node can read (a shared file system, object storage
mounted alike, the hub); an in-memory dataset is shipped once through Ray's
object store. Every node needs loes and the model's packages installed, and
the store folder must be shared by the nodes (the driver writes the manifest
after the workers wrote the shards).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import torch

from loes._deps import require
from loes._exceptions import LOESError
from loes._progress import ProgressSetting, progress, warnings_at_caller
from loes.hf import _models as M
from loes.hf.config import ExtractionConfig, check_keywords
from loes.hf.data import as_row_stream, load_dataset_any
from loes.hf.export import DEFAULT_SHARD_ROWS, prepare_export, rows_fingerprint
from loes.store import FeatureStore

__all__ = ["extract"]

logger = logging.getLogger(__name__)


def _ray() -> Any:
    require("ray.data", extra="ray", package="ray[data]")
    return require("ray", extra="ray", package="ray[data]")


class _ShardWorker:
    """A Ray Data actor: loads the model and the dataset once, then computes shards."""

    def __init__(self, payload: list[Any], *, load: dict[str, Any], device: str, threads: int):
        torch.set_num_threads(threads)
        # (job, model, data), put once in the object store and fetched once per actor: the
        # model is a source to load or (class, config, state); the data an in-memory
        # dataset or {"name", "split", "config"} to read
        job, model, data = _ray().get(payload[0])
        if isinstance(model, str):
            model = M.load_model(model, device=device, **load)
        else:  # the caller's model as (class, config, state): models do not all pickle
            cls, config, state = model
            model = cls(config)
            model.load_state_dict(state)
            model = model.to(device).eval()
        if isinstance(data, dict):  # a path or hub id every node can read
            data, _ = load_dataset_any(
                data["name"], split=data["split"], config_name=data["config"]
            )
        self.job, self.model, self.data = job, model, data

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {"shard": [], "computed": [], "error": []}
        for shard in batch["shard"].tolist():
            rows = self.job.writer.shard_rows_of(int(shard), len(self.data))
            error = ""
            try:  # a user mistake comes back as data: Ray would bury it in its own errors
                computed = self.job.run(
                    self.model, self.data.select(range(rows.start, rows.stop)), int(shard)
                )
            except LOESError as e:
                computed, error = False, str(e)
            out["shard"].append(int(shard))
            out["computed"].append(computed)
            out["error"].append(error)
        return {k: np.asarray(v) for k, v in out.items()}


def _check_count(name: str, value: Any, *, minimum: float, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise LOESError(f"{name} must be a number >= {minimum}; got {value!r}")


@warnings_at_caller
@check_keywords
def extract(
    model: Any,
    dataset: Any,
    path: Any,
    *,
    layers: Any = None,
    pooling: str = "auto",
    text_key: Any = None,
    target_key: str | None = None,
    split: str = "train",
    dataset_config_name: str | None = None,
    max_length: int | None = None,
    batch_size: int = 32,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    num_workers: int | None = None,
    num_gpus_per_worker: float = 0,
    num_cpus_per_worker: int = 1,
    address: str | None = None,
    dtype: Any = None,
    storage_dtype: str = "float32",
    include_embeddings: bool = False,
    sort_by_length: bool = True,
    overwrite: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
    processor: Any = None,
    tokenizer: Any = None,
    model_kwargs: dict[str, Any] | None = None,
    show_progress: ProgressSetting = "auto",
    verbose: bool = False,
) -> FeatureStore:
    """Features of every row of a dataset, computed by a pool of Ray workers, to a feature store.

    The store equals :func:`loes.hf.export_features`'s on the same arguments
    (same shards and plan, features within floating-point tolerance), so either
    can finish what the other began on the same device type. Resumable: shards
    already written from the same rows and settings are not computed again.

    Parameters
    ----------
    model : str or torch.nn.Module
        A hub id or a local folder (each worker loads it once), or a model object
        (shipped once through Ray's object store; each worker gets its own copy).
        The driver also loads it once on its CPU to fingerprint it and read one row.
    dataset : str, datasets.Dataset, DatasetDict or DataFrame
        A path or hub id (each worker reads it: on a cluster, a path every node
        can read), or an in-memory dataset (shipped once). A stream cannot be split
        between workers: use :func:`loes.hf.export_features`, or save it first
        (``Dataset.from_generator(...).to_parquet(...)``).
    path : str or path-like
        The store's folder; on a cluster, a folder every node can write.
    num_workers : int, optional
        Actors in the pool (default: as many as the cluster's GPUs or CPUs hold at
        the per-worker amounts; never more than the pending shards). The driver
        finds the pending shards by hashing each shard's rows.
    num_gpus_per_worker : float
        GPUs per actor (0: CPU workers; 1: one GPU each, run there in bf16/fp16
        unless ``dtype`` says otherwise).
    num_cpus_per_worker : int
        CPUs per actor (its torch threads).
    address : str, optional
        ``ray.init(address=...)`` when Ray is not initialised yet (``None``: a
        local Ray, shut down at the end). An initialised Ray is used as it is.
    layers, pooling, text_key, target_key, split, dataset_config_name, max_length,
    batch_size, shard_rows, dtype, storage_dtype, include_embeddings, sort_by_length,
    overwrite, revision, trust_remote_code, processor, tokenizer, model_kwargs, verbose
        As in :func:`loes.hf.export_features`.
    show_progress : bool or {"auto", "on", "off"}
        One step per finished shard on stderr (Ray's own bars are off).

    Returns
    -------
    FeatureStore
        ``store.info["computed"]``: the shards this call computed; ``info["workers"]``.

    Examples
    --------
    On a running cluster (not run here: it needs one)::

        import ray
        ray.init(address="auto")            # omit for a local Ray started for the call
        store = extract("org/model", "/shared/data/train.parquet", "/shared/features",
                        layers=[8, 16], num_gpus_per_worker=1)
    """
    if processor is not None and tokenizer is not None and processor is not tokenizer:
        raise LOESError("pass either processor=... or tokenizer=..., not both")
    _check_count("num_workers", num_workers, minimum=1, allow_none=True)
    _check_count("num_gpus_per_worker", num_gpus_per_worker, minimum=0)
    _check_count("num_cpus_per_worker", num_cpus_per_worker, minimum=1)
    if isinstance(num_workers, float) or isinstance(num_cpus_per_worker, float):
        raise LOESError("num_workers and num_cpus_per_worker must be ints")
    if address is not None and not isinstance(address, str):
        raise LOESError(
            f"address must be a string such as 'auto' or 'ray://host:10001'; got {address!r}"
        )
    cfg = ExtractionConfig(
        pooling=pooling,
        batch_size=batch_size,
        max_length=max_length,
        max_samples=None,
        device="cpu",
        dtype=dtype,
        include_embeddings=include_embeddings,
        layers=layers,
        sort_by_length=sort_by_length,
    )
    ray = _ray()
    if as_row_stream(dataset)[1]:
        raise LOESError(
            "a stream cannot be split between Ray workers: use loes.hf.export_features for a "
            "stream, or save it first (e.g. Dataset.from_generator(...).to_parquet('rows.parquet'))"
        )
    device = "cuda" if num_gpus_per_worker > 0 else "cpu"
    load = dict(
        revision=revision,
        trust_remote_code=trust_remote_code,
        dtype=dtype,
        **(model_kwargs or {}),
    )
    t0 = time.perf_counter()
    exp = prepare_export(
        model,
        dataset,
        path,
        cfg=cfg,
        shard_rows=shard_rows,
        storage_dtype=storage_dtype,
        overwrite=overwrite,
        text_key=text_key,
        target_key=target_key,
        split=split,
        dataset_config_name=dataset_config_name,
        revision=revision,
        trust_remote_code=trust_remote_code,
        processor=processor if processor is not None else tokenizer,
        model_kwargs=model_kwargs,
        verbose=verbose,
        run_device=device,
    )
    writer, n_rows = exp.job.writer, int(exp.n_rows)
    pending = []
    for s in range(writer.n_shards(n_rows)):
        rows = writer.shard_rows_of(s, n_rows)
        if not writer.done(
            s, data=rows_fingerprint(exp.dataset.select(range(rows.start, rows.stop)))
        ):
            pending.append(s)
    computed: list[int] = []
    workers = 0
    if pending:
        started = not ray.is_initialized()
        if started:
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=verbose,
                logging_level=logging.INFO if verbose else logging.WARNING,
            )
        try:
            workers = _pool_size(ray, num_workers, num_gpus_per_worker, num_cpus_per_worker)
            workers = min(workers, len(pending))
            computed = _run_pool(
                ray,
                exp,
                pending,
                source=model if isinstance(model, (str, os.PathLike)) else None,
                data=dataset,
                split=split,
                config_name=dataset_config_name,
                load=load,
                device=device,
                workers=workers,
                gpus=num_gpus_per_worker,
                cpus=num_cpus_per_worker,
                show_progress=show_progress,
                verbose=verbose,
            )
        finally:
            if started:
                ray.shutdown()
    logger.info(
        "distributed export to %s: %d rows, %d of %d shards computed by %d workers in %.1fs",
        writer.path,
        n_rows,
        len(computed),
        writer.n_shards(n_rows),
        workers,
        time.perf_counter() - t0,
    )
    return writer.finish(n_rows, info={**exp.info, "computed": computed, "workers": workers})


def _pool_size(ray: Any, num_workers: int | None, gpus: float, cpus: int) -> int:
    if num_workers is not None:
        return int(num_workers)
    resources = ray.cluster_resources()
    if gpus > 0:
        n = int(resources.get("GPU", 0) // gpus)
        if n < 1:
            raise LOESError(
                f"num_gpus_per_worker={gpus} but the Ray cluster has {resources.get('GPU', 0)} "
                "GPUs: pass num_gpus_per_worker=0 for CPU workers"
            )
        return n
    return max(1, int(resources.get("CPU", 1) // cpus))


def _run_pool(
    ray: Any,
    exp: Any,
    pending: list[int],
    *,
    source: Any,
    data: Any,
    split: str,
    config_name: str | None,
    load: dict[str, Any],
    device: str,
    workers: int,
    gpus: float,
    cpus: int,
    show_progress: ProgressSetting,
    verbose: bool,
) -> list[int]:
    """Run the actor pool over the pending shards; returns the shards computed."""
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_log = logging.getLogger("ray.data")
    level = ray_log.level
    if not verbose:  # Ray Data's plan, start and finish lines
        ray_log.setLevel(logging.ERROR)
    if isinstance(data, (str, os.PathLike)):
        data_arg: Any = {"name": os.fspath(data), "split": split, "config": config_name}
    else:
        data_arg = exp.dataset
    if source is not None:
        payload = ray.put((exp.job, os.fspath(source), data_arg))
    else:
        with exp.borrow():  # the caller's model, on the CPU while it is serialised
            m = exp.model
            payload = ray.put((exp.job, (type(m), m.config, m.state_dict()), data_arg))
    shards = ray.data.from_items([{"shard": s} for s in pending], override_num_blocks=len(pending))
    out = shards.map_batches(
        _ShardWorker,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cpus,
        num_gpus=gpus,
        fn_constructor_args=([payload],),
        fn_constructor_kwargs={"load": load, "device": device, "threads": cpus},
    )
    computed, errors = [], []
    try:
        for row in progress(
            out.iter_rows(),
            show_progress,
            desc="loes: extract (ray)",
            total=len(pending),
            unit="shard",
        ):
            if row["computed"]:
                computed.append(int(row["shard"]))
            if row["error"]:
                errors.append((int(row["shard"]), str(row["error"])))
    finally:
        ray_log.setLevel(level)
    if errors:
        raise LOESError(
            f"{len(errors)} shard(s) failed, the others are written (rerun to finish): "
            f"{min(errors)[1]}"
        )
    return sorted(computed)
