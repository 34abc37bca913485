"""Extraction: pooled per-layer features (N, L, D) and a token-level stream.

:func:`extract_embeddings` is the one function selection, metrics and
baselines call. :func:`iter_hidden_states` streams the token states of one
batch at a time for token-level metrics (prompt entropy, curvature).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from loes._exceptions import LOESError, LOESWarning
from loes._progress import (
    ProgressSetting,
    find_stacklevel,
    progress,
    quiet_third_party,
    verbose_logger,
    warnings_at_caller,
)
from loes._validation import normalize_task
from loes.hf import _models as M
from loes.hf import cache as C
from loes.hf import fingerprint as F
from loes.hf.capture import LayerCapture
from loes.hf.config import ExtractionConfig, check_keywords, sampling_random_state
from loes.hf.data import (
    Batch,
    CalibrationData,
    as_row_stream,
    from_dataloader,
    from_dataset,
    from_stream,
    group_norm_audio,
    is_dataloader,
    warn_dataloader_sample,
)
from loes.hf.pooling import choose_pooling, declared_pooling, pool, resolve_pooling
from loes.hf.sampling import DEFAULT_MAX_SAMPLES
from loes.layers import resolve_layers

__all__ = ["Embeddings", "TokenStates", "extract_embeddings", "iter_hidden_states", "pool_batch"]

logger = logging.getLogger(__name__)


@dataclass
class Embeddings:
    """Pooled calibration features of every layer.

    Attributes
    ----------
    embeddings : float32 CPU tensor of shape (n_samples, n_layers, dim), or a
        list of n_layers tensors of shape (n_samples, dim_l) when widths differ
        (CNN stages)
    targets : ndarray of shape (n_samples,) or (n_samples, m), or None
    layer_names : list of str
        Which hidden state each layer index is, e.g. ``"hidden_states[1]"``
        (index 0 = first block) or ``"encoder.hidden_states[3]"``.
    pooling : str
        The pooling used ("auto" resolved).
    model_name, dataset : str
        Provenance.
    indices : ndarray of int64, optional
        Rows of the dataset split that were sampled (None for a dataloader read in order).
    from_cache : bool
        Whether the features were read from the cache.
    info : dict
        Extraction settings (device, dtype, family, max_length, timings, ...).
    """

    embeddings: torch.Tensor | list[torch.Tensor]
    targets: np.ndarray | None
    layer_names: list[str]
    pooling: str
    model_name: str | None = None
    dataset: str | None = None
    indices: np.ndarray | None = None
    from_cache: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        e = self.embeddings
        return int(e.shape[0] if torch.is_tensor(e) else e[0].shape[0])

    @property
    def n_layers(self) -> int:
        return len(self.layer_names)

    def layer(self, index: int) -> torch.Tensor:
        """Features of one layer, shape (n_samples, dim)."""
        e = self.embeddings
        return e[:, index] if torch.is_tensor(e) else e[index]


@dataclass
class TokenStates:
    """The token states of one batch, as yielded by :func:`iter_hidden_states`.

    Attributes
    ----------
    hidden_states : tuple of tensors of shape (batch, tokens, dim)
        (or (batch, channels, height, width) for CNN stages), one per layer, on
        the model's device; released when the next batch is requested.
    mask : bool tensor of shape (batch, tokens), optional
        Real tokens/frames (``None``: every position is real).
    positions : ndarray of shape (batch,)
        Positions of the rows in the calibration order.
    targets : ndarray, optional
    layer_names : list of str
    """

    hidden_states: tuple[torch.Tensor, ...]
    mask: torch.Tensor | None
    positions: np.ndarray
    targets: np.ndarray | None
    layer_names: list[str]


@dataclass
class _Plan:
    """A checked request: the model (loaded or the caller's), its config, the calibration data."""

    model: torch.nn.Module
    name: str
    config: Any
    data: CalibrationData
    settings: ExtractionConfig
    max_length: int
    source: str | None
    borrowed: bool
    get_processor: Callable[[str], Any]
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype | None = None
    autocast: torch.dtype | None = None


def _prepare(
    model_or_id: Any,
    dataset: Any,
    dataloader: Any,
    cfg: ExtractionConfig,
    *,
    task: str,
    split: str,
    dataset_config_name: str | None,
    text_key: Any,
    target_key: str | None,
    random_state: Any,
    revision: str | None,
    trust_remote_code: bool,
    processor: Any,
    tokenizer: Any,
    collate_fn: Callable | None,
    gguf_file: str | None,
    model_kwargs: dict[str, Any] | None,
    k: int | None = None,
) -> _Plan:
    """Check everything cheap, read the model's config, load the data, then the model.

    Order: arguments (no I/O) -> the model's config (a small file) -> the dataset
    (labels checked, sample drawn) -> the model weights. A dataloader needs the
    model's forward signature, so it is wrapped after the model is loaded.
    """
    task = normalize_task(task)
    random_state = sampling_random_state(random_state)
    if processor is not None and tokenizer is not None and processor is not tokenizer:
        raise LOESError("pass either processor=... or tokenizer=..., not both")
    processor = processor if processor is not None else tokenizer
    stream = False
    if dataloader is None and dataset is not None:
        dataset, stream = as_row_stream(dataset)
        if not stream and is_dataloader(dataset):
            dataloader, dataset = dataset, None
    if dataloader is None and dataset is None:
        raise LOESError(
            "pass dataset=... (a hub id, path, Dataset, DatasetDict or DataFrame) or dataloader=..."
        )
    if dataloader is not None and dataset is not None:
        raise LOESError("pass either dataset=... or dataloader=..., not both")
    if isinstance(model_or_id, (str, os.PathLike)):
        source: str | None = os.fspath(model_or_id)
        M.check_source(source, revision=revision)
        config = M.load_config(
            source, revision=revision, trust_remote_code=trust_remote_code, gguf_file=gguf_file
        )
        model: torch.nn.Module | None = None
    elif isinstance(model_or_id, torch.nn.Module):
        model = model_or_id
        config = getattr(model, "config", None)
        source = getattr(config, "_name_or_path", None) or None
    else:
        raise LOESError(
            f"model must be a Hugging Face model (torch.nn.Module), a hub id or a local folder; "
            f"got {type(model_or_id).__name__}"
        )
    n_blocks = M.n_hidden_layers(config)
    if isinstance(k, int) and n_blocks is not None and k > n_blocks + int(cfg.include_embeddings):
        raise LOESError(
            f"k={k} but the model has {n_blocks + int(cfg.include_embeddings)} layers to "
            f"select from (config.num_hidden_layers={n_blocks}): pass k<={n_blocks}"
        )
    if cfg.layers is not None and n_blocks is not None:
        resolve_layers(
            cfg.layers, n_blocks + int(cfg.include_embeddings)
        )  # out of range: LOESError now
    if model is not None and any(v is not None for v in (cfg.device_map, cfg.quantization_config)):
        raise LOESError(
            "device_map=... and quantization_config=... apply when loes loads the model: pass "
            "a model id or folder, or load the model yourself with them"
        )
    max_length = cfg.resolved_max_length(M.position_limit(config))
    cache: dict[str, Any] = {}

    def get_processor(modality: str) -> Any:
        if modality not in cache:
            if processor is not None:
                cache[modality] = M.pick_processor(processor, modality)
            elif source:
                cache[modality] = M.load_processor(
                    source,
                    modality,
                    revision=revision,
                    trust_remote_code=trust_remote_code,
                    gguf_file=gguf_file,
                )
            else:
                raise LOESError(
                    f"this model has no saved {modality} processor to load: pass processor=... "
                    "(e.g. a tokenizer, image processor or feature extractor)"
                )
        return cache[modality]

    data = None
    if stream:
        data = from_stream(
            dataset,
            get_processor=get_processor,
            config=config,
            task=task,
            text_key=text_key,
            target_key=target_key,
            max_samples=cfg.max_samples,
            batch_size=cfg.batch_size,
            max_length=max_length,
            random_state=random_state,
            collate_fn=collate_fn,
            num_workers=cfg.num_workers,
            sort_by_length=cfg.sort_by_length,
        )
    elif dataset is not None:
        data = from_dataset(
            dataset,
            get_processor=get_processor,
            config=config,
            task=task,
            split=split,
            config_name=dataset_config_name,
            text_key=text_key,
            target_key=target_key,
            max_samples=cfg.max_samples,
            batch_size=cfg.batch_size,
            max_length=max_length,
            random_state=random_state,
            collate_fn=collate_fn,
            num_workers=cfg.num_workers,
            sort_by_length=cfg.sort_by_length,
        )
    if model is None:
        placement = {
            k: v
            for k, v in (
                ("device_map", cfg.device_map),
                ("max_memory", cfg.max_memory),
                ("offload_folder", cfg.offload_folder),
                ("quantization_config", cfg.quantization_config),
            )
            if v is not None
        }
        model = M.load_model(
            source,
            revision=revision,
            trust_remote_code=trust_remote_code,
            device=cfg.device,
            dtype=cfg.dtype,
            gguf_file=gguf_file,
            **{**placement, **(model_kwargs or {})},
        )
        config = getattr(model, "config", config)
    if data is None:
        bb = M.backbone(model, "unknown")
        data = from_dataloader(
            dataloader,
            get_processor=get_processor,
            config=config,
            task=task,
            target_key=target_key,
            text_key=text_key,
            max_samples=cfg.max_samples,
            max_length=max_length,
            random_state=random_state,
            main_input_name=getattr(model, "main_input_name", "input_ids"),
            positional_names=bb.positional,
        )
    name = os.fspath(model_or_id) if model_or_id is not model else M.model_name(model)
    return _Plan(
        model=model,
        name=name,
        config=config,
        data=data,
        settings=cfg,
        max_length=max_length,
        source=source,
        borrowed=model is model_or_id,
        get_processor=get_processor,
    )


def _run_settings(
    model: torch.nn.Module, cfg: ExtractionConfig
) -> tuple[torch.device, torch.dtype | None, torch.dtype | None]:
    """(device, parameter dtype, autocast dtype) the model will run with."""
    try:
        param = next(model.parameters())
    except StopIteration:
        return M.default_device(cfg.device), None, None
    if M.is_placed(model):
        if cfg.device is not None or cfg.dtype is not None:
            raise LOESError(
                "this model is placed by accelerate (device_map) or quantised: it runs where it "
                "is; don't pass device=... or dtype=..."
            )
        return M.input_device(model), None, None
    dev = param.device if cfg.device is None else M.default_device(cfg.device)
    dtype = M.parse_dtype(cfg.dtype, dev) if cfg.dtype is not None else param.dtype
    autocast = None
    if dev.type == "cuda" and cfg.dtype is None and param.dtype == torch.float32:
        autocast = M.parse_dtype(None, dev)  # bf16/fp16 compute without touching the weights
    return dev, dtype, autocast


@contextlib.contextmanager
def _running(plan: _Plan) -> Iterator[None]:
    """Put the model on the run's device and dtype in eval mode; give the caller's model back
    as it came (every parameter, gradient and buffer tensor, and each module's training flag)."""
    model = plan.model
    plan.device, plan.dtype, plan.autocast = _run_settings(model, plan.settings)
    modes = [(m, m.training) for m in model.modules()]
    params = [(p, p.data, None if p.grad is None else p.grad.data) for p in model.parameters()]
    buffers = [
        (m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None
    ]
    try:
        if plan.settings.device is not None or plan.settings.dtype is not None:
            model.to(device=plan.device, dtype=plan.dtype)
        model.eval()
        yield
    finally:
        if plan.borrowed:
            for p, data, grad in params:
                p.data = data
                if grad is not None:
                    p.grad.data = grad
            for m, name, b in buffers:
                m._buffers[name] = b
            for m, flag in modes:
                m.training = flag


Keep = Callable[[torch.Tensor, torch.Tensor | None], Any]


def _stream(
    plan: _Plan, *, show_progress: ProgressSetting, info: dict[str, Any], keep: Keep | None = None
) -> Iterator[TokenStates]:
    """Run the model batch by batch; only one batch's states are alive at a time.

    Only the layers of ``plan.settings.layers`` are kept (:class:`~loes.hf.capture.LayerCapture`),
    each passed through ``keep(state, mask)`` as soon as the block has produced it
    (``mask``: real positions at the state's resolution, or None); without ``keep`` the
    token states themselves are yielded. On CUDA out-of-memory the batch is split in
    halves (and later batches too) and the run goes on.
    """
    names: list[str] | None = None
    bb = None
    decoder = False
    total = None
    warned_padding = False
    capture: LayerCapture | None = None
    limit = [plan.settings.batch_size]
    if plan.data.n_samples is not None:
        total = -(-plan.data.n_samples // plan.settings.batch_size)
    for batch in progress(
        plan.data.batches(), show_progress, desc="loes: extract", total=total, unit="batch"
    ):
        if bb is None:
            modality = (
                plan.data.modality
                if plan.data.modality != "unknown"
                else M.modality_of(batch.inputs)
            )
            bb = M.backbone(plan.model, modality)
            decoder = M.family(plan.model, modality) == "decoder"
            info.update(
                modality=modality,
                family=M.family(plan.model, modality),
                module=type(bb.module).__name__,
                model_type=M.model_type(bb.module) or M.model_type(plan.model),
            )
            capture = LayerCapture(
                bb.module, plan.settings.layers, include_embeddings=plan.settings.include_embeddings
            )
        if (
            not warned_padding
            and batch.mask is not None
            and group_norm_audio(plan.config)
            and not bool(batch.mask.bool().all())
        ):
            warned_padding = True
            warnings.warn(
                "this audio model normalises over time (feat_extract_norm='group'): a padded clip's "
                "features depend on the clips it is batched with; pass a dataset (loes then batches "
                "only equal-length clips) or a dataloader with batch_size=1",
                LOESWarning,
                stacklevel=find_stacklevel(),
            )
        parts = [batch]
        while parts:
            part = parts.pop(0)
            if len(part.positions) > limit[0]:
                parts[:0] = _split(part, limit[0])
                continue
            try:
                item = _forward(
                    (plan.device, plan.dtype, plan.autocast),
                    bb,
                    capture,
                    part,
                    decoder=decoder,
                    keep=keep,
                )
            except torch.cuda.OutOfMemoryError:
                n = len(part.positions)
                if n == 1:
                    raise LOESError(
                        "CUDA out of memory on a batch of one row: pass a smaller max_length, "
                        "dtype='bfloat16', or device_map='auto' with max_memory=..."
                    ) from None
                limit[0] = n // 2
                info["oom_batch_size"] = limit[0]
                logger.warning(
                    "CUDA out of memory on a batch of %d rows: going on with batches of %d",
                    n,
                    limit[0],
                )
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                parts[:0] = _split(part, limit[0])
                continue
            if names is None:
                names = [f"{bb.prefix}hidden_states[{h}]" for h in capture.states]
                info.update(
                    hidden_state_indices=list(capture.states),
                    capture="hooks" if capture.hooked else "full forward",
                )
            item.layer_names = names
            yield item
            item.hidden_states, item.mask = (), None  # release before the next forward


def _split(batch: Batch, size: int) -> list[Batch]:
    """``batch`` as consecutive batches of at most ``size`` rows (same padded width)."""
    n = len(batch.positions)
    return [
        Batch(
            inputs={
                k: (v[a : a + size] if torch.is_tensor(v) and v.ndim and v.shape[0] == n else v)
                for k, v in batch.inputs.items()
            },
            mask=None if batch.mask is None else batch.mask[a : a + size],
            positions=batch.positions[a : a + size],
            targets=None if batch.targets is None else batch.targets[a : a + size],
        )
        for a in range(0, n, size)
    ]


def _forward(
    run: tuple[torch.device, torch.dtype | None, torch.dtype | None],
    bb: M.Backbone,
    capture: LayerCapture,
    batch: Batch,
    *,
    decoder: bool,
    keep: Keep | None,
) -> TokenStates:
    """One forward pass over ``batch`` on ``run`` = (device, input dtype, autocast dtype):
    the kept states of the requested layers."""
    device, dtype, autocast = run
    inputs = {
        k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
        for k, v in batch.inputs.items()
    }
    if dtype is not None and dtype.is_floating_point:
        for key in ("pixel_values", "input_values", "input_features"):
            if key in inputs and torch.is_tensor(inputs[key]) and inputs[key].is_floating_point():
                inputs[key] = inputs[key].to(dtype)
    kwargs = M.forward_kwargs(bb, inputs, decoder=decoder)
    amp = (
        torch.autocast(device.type, dtype=autocast)
        if autocast is not None
        else contextlib.nullcontext()
    )
    batch_mask = batch.mask.to(device) if batch.mask is not None else None
    masks: dict[int, torch.Tensor | None] = {}

    def mask_of(h: torch.Tensor) -> torch.Tensor | None:
        if h.ndim != 3:
            return None
        if h.shape[1] not in masks:
            masks[h.shape[1]] = M.frame_mask(bb.module, batch_mask, h.shape[1])
        return masks[h.shape[1]]

    with torch.inference_mode(), amp:
        if capture.states is None:
            capture.prepare(kwargs, len(batch.positions))
        kept = capture.run(
            kwargs, (lambda i, h: h) if keep is None else (lambda i, h: keep(h, mask_of(h)))
        )
        mask = None
        if keep is None and kept and kept[0].ndim == 3:
            mask = mask_of(kept[0])
    return TokenStates(
        hidden_states=tuple(kept),
        mask=mask,
        positions=batch.positions,
        targets=batch.targets,
        layer_names=[],
    )


@warnings_at_caller
@check_keywords
def iter_hidden_states(
    model: Any,
    dataset: Any = None,
    *,
    dataloader: Any = None,
    split: str = "train",
    dataset_config_name: str | None = None,
    text_key: Any = None,
    target_key: str | None = None,
    task: str = "label_free",
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
    batch_size: int = 32,
    device: Any = None,
    dtype: Any = None,
    include_embeddings: bool = False,
    layers: Any = None,
    revision: str | None = None,
    random_state: Any = 0,
    show_progress: ProgressSetting = "auto",
    trust_remote_code: bool = False,
    processor: Any = None,
    tokenizer: Any = None,
    collate_fn: Callable | None = None,
    max_length: int | None = None,
    num_workers: int = 0,
    gguf_file: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    config: ExtractionConfig | None = None,
) -> Iterator[TokenStates]:
    """Stream the per-layer token states of the calibration data, one batch at a time.

    Same data handling as :func:`extract_embeddings` (sampling, tokenization,
    padding, processors). Each :class:`TokenStates` holds the tuple of per-layer
    states (batch, tokens, dim) on the model's device and the token/frame mask;
    its tensors are released when the next batch is requested, so at most one
    batch of token states is alive. Pool or copy what you need inside the loop.
    ``layers=`` keeps only those layers' states (hooks on the blocks, the
    forward stopping after the deepest; see :func:`extract_embeddings`).
    ``task="label_free"`` (the default here) does not require targets. The
    arguments are checked when the function is called, before the first batch;
    a caller's model is restored when the stream is exhausted or closed.

    Examples
    --------
    >>> for b in iter_hidden_states(model, ds, max_samples=64):   # doctest: +SKIP
    ...     lengths = b.mask.sum(1)                          # real tokens per row
    ...     last = b.hidden_states[-1]                        # (batch, tokens, dim)
    """
    cfg = ExtractionConfig.from_keywords(
        config,
        max_samples=max_samples,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        include_embeddings=include_embeddings,
        max_length=max_length,
        num_workers=num_workers,
        layers=layers,
    )
    with quiet_third_party(gguf=gguf_file is not None):
        plan = _prepare(
            model,
            dataset,
            dataloader,
            cfg,
            task=task,
            split=split,
            dataset_config_name=dataset_config_name,
            text_key=text_key,
            target_key=target_key,
            random_state=random_state,
            revision=revision,
            trust_remote_code=trust_remote_code,
            processor=processor,
            tokenizer=tokenizer,
            collate_fn=collate_fn,
            gguf_file=gguf_file,
            model_kwargs=model_kwargs,
        )
    return _borrowed_stream(plan, show_progress)


def _borrowed_stream(plan: _Plan, show_progress: ProgressSetting) -> Iterator[TokenStates]:
    with _running(plan):
        yield from _stream(plan, show_progress=show_progress, info={})


@warnings_at_caller
@check_keywords
def extract_embeddings(
    model_or_id: Any,
    dataset: Any = None,
    *,
    dataloader: Any = None,
    split: str = "train",
    dataset_config_name: str | None = None,
    text_key: Any = None,
    target_key: str | None = None,
    task: str = "classification",
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
    batch_size: int = 32,
    pooling: str = "auto",
    device: Any = None,
    dtype: Any = None,
    include_embeddings: bool = False,
    layers: Any = None,
    sort_by_length: bool = True,
    device_map: None | str | dict[str, Any] = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: None | str | os.PathLike = None,
    quantization_config: Any = None,
    cache_dir: None | bool | str | os.PathLike = None,
    cache_key: str | None = None,
    cache_max_bytes: int | None = None,
    revision: str | None = None,
    random_state: Any = 0,
    show_progress: ProgressSetting = "auto",
    verbose: bool = False,
    trust_remote_code: bool = False,
    processor: Any = None,
    tokenizer: Any = None,
    collate_fn: Callable | None = None,
    max_length: int | None = None,
    num_workers: int = 0,
    gguf_file: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    config: ExtractionConfig | None = None,
) -> Embeddings:
    """Pooled features of every layer of a Hugging Face model on calibration data.

    Parameters
    ----------
    model_or_id : torch.nn.Module, or str
        A loaded model, a hub id or a local folder (loaded with
        ``AutoModel.from_pretrained(..., revision=, trust_remote_code=)``; bf16/fp16
        on CUDA, fp32 on CPU unless ``dtype`` says otherwise). A model passed in
        is given back as it came (device, dtype, training mode, values).
    dataset : str, datasets.Dataset, datasets.DatasetDict or pandas.DataFrame, optional
        Hub id, local file/folder, ``"loes:drugreview"``/``"loes:bbc_news"``, or a
        loaded dataset (``split`` picks from a ``DatasetDict``). Raw text is
        tokenized with the model's tokenizer from a text column (text, sentence,
        query, document, ...; sentence pairs as pairs); tokenized columns are
        padded per batch; images go through the image processor, audio through
        the feature extractor (group-norm audio models get pad-free batches of
        equal-length clips).
    dataloader : iterable, optional
        Yields ``(inputs, targets)`` or dicts with a target key (labels, label,
        targets, target, y). A sequential map-style DataLoader longer than
        ``max_samples`` is re-drawn as a seeded random subset.
    text_key, target_key : str, optional
        Input and target columns (detected when omitted; a missing one raises a
        :class:`~loes.LOESError` listing the columns). ``text_key`` may be a pair.
    task : {"classification", "regression", "label_free"}
        Classification samples are stratified by class; label-free needs no targets.
    max_samples : int or None
        Calibration sample cap (default 1024); a seeded draw, never the first rows.
    batch_size : int >= 1
    pooling : {"auto", "cls", "mean", "masked_mean", "max", "last_token"}
        ``"auto"``: a sentence-transformers model's declared pooling (its
        ``modules.json`` / ``1_Pooling/config.json``), else cls for text encoders
        and ViTs, last token for decoders, masked mean for audio frames and other
        encoders; spatial mean for 4-D states. The choice and its reason are in
        ``pooling`` and ``info["pooling_reason"]`` (:func:`loes.hf.pooling.choose_pooling`).
    verbose : bool
        Log loes's steps, and let transformers / huggingface_hub show their own
        logging, progress bars and warnings (hidden by default).
    device, dtype
        Where and in which precision to run (defaults: CUDA if available; bf16/fp16
        on CUDA for models loaded here, autocast for fp32 models passed in).
        ``dtype`` is transformers' ``torch_dtype``: "bfloat16", "float16", "float32".
    include_embeddings : bool
        Keep the embedding output as layer 0 (default: index 0 = first block).
    layers : layer spec, optional
        Keep only these layers (``None``: all): ints (negative from the end), a
        list, ``"1,4,-1"``, ``"first"``, ``"middle"``, ``"last"``, ``"all"``,
        ``"sweep:..."``. Hooks on the blocks pool each requested state as it is
        produced and the forward stops after the deepest one (layers [3, 7, 12] of a
        32-block model run 13 blocks); returned in increasing order, named by
        ``layer_names``.
    sort_by_length : bool
        Batch texts of similar length together (longest first) to cut padding;
        rows come back in the calibration order.
    device_map, max_memory, offload_folder, quantization_config
        Big models (loaded by id): passed to ``from_pretrained``. ``device_map="auto"``
        spreads the model over the GPUs, the CPU and ``offload_folder`` (accelerate)
        within ``max_memory`` (e.g. ``{0: "20GiB", "cpu": "60GiB"}``);
        ``quantization_config`` loads a quantised checkpoint (e.g. bitsandbytes).
        Pooled states go to the CPU per batch; on CUDA out-of-memory the batch is
        halved and the run goes on.
    cache_dir : str, path or bool, optional
        Cache folder (``True``: ``~/.cache/loes``). A hit needs the same model
        class, config, weights and buffers (every byte), tokenizer/processor,
        transformers and loes versions, data rows, pooling, max_length, layers
        and dtype. Dataloaders are cached only with an explicit ``cache_key``.
    cache_max_bytes : int, optional
        Size cap of the cache folder (default ``$LOES_CACHE_MAX_BYTES``, else none).
    random_state : None, int, numpy Generator/RandomState or torch.Generator
        Seed of the calibration draw (:func:`loes._rng.check_random_state`).
    processor, tokenizer : optional
        Tokenizer / image processor / feature extractor to use instead of the
        model's saved one (required for models built from a config).
    max_length : int >= 2, optional
        Token budget per text (default 512, capped at the model's positions; a
        larger explicit value is an error).
    config : ExtractionConfig, optional
        The extraction settings as one object (instead of their keywords).

    Returns
    -------
    Embeddings
        ``embeddings`` (n_samples, n_layers, dim) float32 on CPU, ``targets``,
        ``layer_names``, ``pooling``, ``indices``.

    Examples
    --------
    >>> from loes.datasets import load_drugreview, minilm_path
    >>> emb = extract_embeddings(minilm_path(), load_drugreview("test"), max_samples=64)
    >>> emb.embeddings.shape, emb.layer_names[0]
    (torch.Size([64, 6, 384]), 'hidden_states[1]')
    """
    cfg = ExtractionConfig.from_keywords(
        config,
        pooling=pooling,
        batch_size=batch_size,
        max_length=max_length,
        max_samples=max_samples,
        device=device,
        dtype=dtype,
        include_embeddings=include_embeddings,
        cache_dir=cache_dir,
        cache_key=cache_key,
        cache_max_bytes=cache_max_bytes,
        num_workers=num_workers,
        layers=layers,
        sort_by_length=sort_by_length,
        device_map=device_map,
        max_memory=max_memory,
        offload_folder=offload_folder,
        quantization_config=quantization_config,
    )
    with quiet_third_party(verbose, gguf=gguf_file is not None):
        return _extract(
            model_or_id,
            dataset,
            dataloader,
            cfg,
            task=task,
            split=split,
            dataset_config_name=dataset_config_name,
            text_key=text_key,
            target_key=target_key,
            random_state=random_state,
            revision=revision,
            trust_remote_code=trust_remote_code,
            processor=processor,
            tokenizer=tokenizer,
            collate_fn=collate_fn,
            gguf_file=gguf_file,
            model_kwargs=model_kwargs,
            show_progress=show_progress,
            verbose=verbose,
        )


_CAPTURES: weakref.WeakKeyDictionary[
    torch.nn.Module, dict[Any, tuple[M.Backbone, LayerCapture]]
] = weakref.WeakKeyDictionary()


def pool_batch(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    layers: Any = None,
    pooling: str = "auto",
    *,
    mask: torch.Tensor | None = None,
    include_embeddings: bool = False,
) -> torch.Tensor | list[torch.Tensor]:
    """Pooled states of the requested layers for one batch of model inputs (the per-batch step
    of :func:`extract_embeddings`, for workers that feed their own batches, e.g. Ray actors).

    Parameters
    ----------
    model : torch.nn.Module
        A Hugging Face model in eval mode, on its device (or dispatched with a
        ``device_map``); it is run where and in the dtype it is (fp32 on CUDA under
        bf16/fp16 autocast) and never changed.
    inputs : dict of str to tensor
        Model inputs of B rows as a tokenizer / processor returns them (``input_ids``
        + ``attention_mask``, ``pixel_values``, ``input_values``, ``input_features``);
        padded text needs its ``attention_mask``.
    layers : layer spec, optional
        As in :func:`extract_embeddings` (``None``: all); kept in increasing order,
        captured by hooks, the forward stopping after the deepest. The hooks are
        checked once per (model, layers) against the model's own hidden states.
    pooling : {"auto", "cls", "mean", "masked_mean", "last_token"}
    mask : bool tensor of shape (B, T), optional
        Real positions at input resolution (default: ``inputs["attention_mask"]``).
    include_embeddings : bool

    Returns
    -------
    float32 CPU tensor of shape (B, n_layers, D), or a list of (B, D_l) tensors when
    the widths differ (CNN stages). Row ``i`` equals row ``i`` of
    :func:`extract_embeddings` on the same inputs and settings.
    """
    if not isinstance(model, torch.nn.Module):
        raise LOESError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if model.training:
        raise LOESError(
            "the model is in training mode (dropout would make features random): call model.eval()"
        )
    cfg = ExtractionConfig(pooling=pooling, layers=layers, include_embeddings=include_embeddings)
    if not isinstance(inputs, dict) or not any(torch.is_tensor(v) for v in inputs.values()):
        raise LOESError(
            "inputs must be a dict of model-input tensors (e.g. a tokenizer's return_tensors='pt' "
            f"output); got {type(inputs).__name__}"
        )
    modality = M.modality_of(inputs)
    per_model = _CAPTURES.setdefault(model, {})
    key = (modality, repr(layers), bool(include_embeddings))
    if key not in per_model:
        bb = M.backbone(model, modality)
        per_model[key] = (
            bb,
            LayerCapture(bb.module, layers, include_embeddings=include_embeddings),
        )
    bb, capture = per_model[key]
    fam = M.family(model, modality)
    n = next(int(v.shape[0]) for v in inputs.values() if torch.is_tensor(v))
    mask = mask if mask is not None else inputs.get("attention_mask")
    resolved: list[str] = []

    def keep(h: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        if not resolved:
            resolved.append(
                resolve_pooling(
                    cfg.pooling, fam, M.model_type(bb.module) or M.model_type(model), h.ndim
                )
            )
        return pool(h, m, resolved[0]).to("cpu", torch.float32)

    item = _forward(
        _run_settings(model, ExtractionConfig()),
        bb,
        capture,
        Batch(inputs=dict(inputs), mask=mask, positions=np.arange(n)),
        decoder=fam == "decoder",
        keep=keep,
    )
    pooled = list(item.hidden_states)
    return torch.stack(pooled, dim=1) if len({p.shape[1] for p in pooled}) == 1 else pooled


def _cache_payload(plan: _Plan, fingerprint: str, task: str) -> dict[str, Any]:
    """Everything that determines the features (see :mod:`loes.hf.fingerprint`)."""
    modality = plan.data.modality
    try:
        proc = plan.get_processor(modality) if modality in ("text", "image", "audio") else None
    except LOESError:
        proc = None
    cfg = plan.settings
    device, dtype, autocast = _run_settings(plan.model, cfg)
    return {
        "model": plan.name,
        "code": F.code_version(plan.model),
        "config": F.config_fingerprint(plan.config),
        "weights": F.weights_fingerprint(plan.model),
        "processor": F.processor_fingerprint(proc),
        "data": fingerprint,
        "n": plan.data.n_samples,
        "task": task,
        "pooling": str(cfg.pooling).lower(),
        "declared_pooling": declared_pooling(plan.source)
        if str(cfg.pooling).lower() == "auto"
        else None,
        "max_length": plan.max_length,
        "include_embeddings": bool(cfg.include_embeddings),
        "layers": _layers_key(cfg, plan.config),
        "device": device.type,
        "dtype": str(dtype),
        "autocast": str(autocast),
    }


def _layers_key(cfg: ExtractionConfig, config: Any) -> Any:
    """The layer set for the cache key: resolved when the config gives the block count."""
    spec = cfg.layers
    if spec is None:
        return None
    n = M.n_hidden_layers(config)
    if n is not None:
        return sorted({int(i) for i in resolve_layers(spec, n + int(cfg.include_embeddings))})
    return spec if isinstance(spec, (int, str)) else [int(i) for i in spec]


def _extract(
    model_or_id: Any,
    dataset: Any,
    dataloader: Any,
    cfg: ExtractionConfig,
    *,
    task: str,
    show_progress: ProgressSetting,
    verbose: bool,
    k: int | None = None,
    **prepare_args: Any,
) -> Embeddings:
    """:func:`extract_embeddings` with checked settings (``k``: checked against the config's layers)."""
    log = verbose_logger(logging.getLogger("loes.hf"), verbose)  # covers loes.hf.* modules
    t0 = time.perf_counter()
    plan = _prepare(model_or_id, dataset, dataloader, cfg, task=task, k=k, **prepare_args)
    t_prep = time.perf_counter()
    data = plan.data
    task = normalize_task(task)
    folder = C.resolve_cache_dir(cfg.cache_dir)
    key = None
    fingerprint = cfg.cache_key if cfg.cache_key is not None else data.fingerprint
    if folder is not None and fingerprint is None:
        log.info(
            "cache skipped: a dataloader has no content fingerprint; pass cache_key=... to cache it"
        )
    elif folder is not None:
        key = C.cache_key(_cache_payload(plan, fingerprint, task))
        hit = C.load_entry(folder, key, n_samples=data.n_samples)
        if hit is not None:
            return _from_cache(hit, plan, key)

    info: dict[str, Any] = {
        "batch_size": cfg.batch_size,
        "max_length": plan.max_length,
        **data.info,
    }
    info.pop("state", None)
    chunks: list[tuple[np.ndarray, list[torch.Tensor]]] = []
    target_chunks: list[np.ndarray] = []
    resolved: list[str] = []
    names: list[str] = []

    def keep(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if not resolved:
            choice, info["pooling_reason"] = choose_pooling(
                cfg.pooling,
                info.get("family", "unknown"),
                info.get("model_type", ""),
                h.ndim,
                source=plan.source,
                module=info.get("module"),
            )
            resolved.append(choice)
        return pool(h, mask, resolved[0]).to("cpu", torch.float32)

    with _running(plan):
        info.update(device=str(plan.device), dtype=str(plan.autocast or plan.dtype))
        if getattr(plan.model, "hf_device_map", None):
            info["device_map"] = sorted({str(v) for v in plan.model.hf_device_map.values()})
        for item in _stream(plan, show_progress=show_progress, info=info, keep=keep):
            names = item.layer_names
            pooled = list(item.hidden_states)
            moved = (
                [torch.stack(pooled, dim=1)] if len({p.shape[1] for p in pooled}) == 1 else pooled
            )
            chunks.append((item.positions, moved))
            if data.targets is None and item.targets is not None:
                target_chunks.append(np.asarray(item.targets))
            del item, pooled
    if not chunks:
        raise LOESError("no calibration samples were read: the dataset/dataloader is empty")
    stacked = _assemble(chunks)
    targets = (
        data.targets
        if data.targets is not None
        else (np.concatenate(target_chunks) if target_chunks else None)
    )
    if data.n_samples is None:
        warn_dataloader_sample(data, targets, task)
    t_end = time.perf_counter()
    info.update(timings={"prepare": t_prep - t0, "extract": t_end - t_prep}, cache_key=key)
    emb = Embeddings(
        embeddings=stacked,
        targets=targets,
        layer_names=names,
        pooling=resolved[0],
        model_name=plan.name,
        dataset=data.name,
        indices=data.indices,
        info=info,
    )
    n = emb.n_samples
    log.info(
        "extracted %d layers x %d samples (%s pooling) from %s in %.2fs",
        emb.n_layers,
        n,
        resolved[0],
        plan.name,
        t_end - t0,
    )
    if folder is not None and key is not None:
        _save(folder, key, emb, C.resolve_max_bytes(cfg.cache_max_bytes))
    return emb


def _assemble(
    chunks: list[tuple[np.ndarray, list[torch.Tensor]]],
) -> torch.Tensor | list[torch.Tensor]:
    """Concatenate per-batch chunks and put rows back in calibration order."""
    positions = np.concatenate([p for p, _ in chunks])
    order = torch.as_tensor(np.argsort(positions, kind="stable"))
    n_parts = len(chunks[0][1])
    parts = [torch.cat([c[1][j] for c in chunks], dim=0)[order] for j in range(n_parts)]
    return parts[0] if n_parts == 1 else parts


def _save(folder, key: str, emb: Embeddings, max_bytes: int | None) -> None:
    tensors: dict[str, torch.Tensor] = {}
    if torch.is_tensor(emb.embeddings):
        tensors["embeddings"] = emb.embeddings
    else:
        tensors.update({f"layer_{i:04d}": t for i, t in enumerate(emb.embeddings)})
    meta: dict[str, Any] = {
        "layer_names": emb.layer_names,
        "pooling": emb.pooling,
        "model_name": emb.model_name,
        "dataset": emb.dataset,
        "info": emb.info,
    }
    if emb.indices is not None:
        tensors["indices"] = torch.as_tensor(np.asarray(emb.indices, dtype=np.int64))
    if emb.targets is not None:
        t = np.asarray(emb.targets)
        if t.dtype.kind in "biuf":
            tensors["targets"] = torch.as_tensor(t)
        else:
            meta["targets"] = t.tolist()
    try:
        C.save_entry(folder, key, tensors, meta, max_bytes=max_bytes)
    except OSError as e:
        logger.warning("could not write the embedding cache in %s: %s", folder, e)


def _from_cache(hit, plan: _Plan, key: str) -> Embeddings:
    tensors, meta = hit
    if "embeddings" in tensors:
        emb: torch.Tensor | list[torch.Tensor] = tensors["embeddings"]
    else:
        emb = [tensors[k] for k in sorted(k for k in tensors if k.startswith("layer_"))]
    targets = None
    if "targets" in tensors:
        targets = tensors["targets"].numpy()
    elif meta.get("targets") is not None:
        targets = np.asarray(meta["targets"])
    indices = tensors["indices"].numpy() if "indices" in tensors else None
    info = dict(meta.get("info") or {})
    info["cache_key"] = key
    return Embeddings(
        embeddings=emb,
        targets=targets,
        layer_names=list(meta["layer_names"]),
        pooling=meta["pooling"],
        model_name=meta.get("model_name") or plan.name,
        dataset=meta.get("dataset"),
        indices=indices,
        from_cache=True,
        info=info,
    )
