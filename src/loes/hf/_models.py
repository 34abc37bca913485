"""Model side of extraction: loading, family detection, the module to run, its inputs."""

from __future__ import annotations

import inspect
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from loes._deps import require
from loes._exceptions import LOESError

logger = logging.getLogger(__name__)

#: Decoder-only language models (pooled at the last token).
DECODER_TYPES = frozenset(
    {
        "bloom",
        "codegen",
        "cohere",
        "cohere2",
        "deepseek_v2",
        "deepseek_v3",
        "falcon",
        "gemma",
        "gemma2",
        "gemma3",
        "gemma3_text",
        "gpt2",
        "gpt_bigcode",
        "gpt_neo",
        "gpt_neox",
        "gptj",
        "granite",
        "internlm2",
        "llama",
        "mistral",
        "mixtral",
        "mpt",
        "olmo",
        "olmo2",
        "opt",
        "phi",
        "phi3",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "smollm3",
        "stablelm",
        "starcoder2",
    }
)
#: Text encoders whose position ids start after the padding index (usable = max - pad - 1).
_OFFSET_POSITIONS = frozenset(
    {
        "camembert",
        "data2vec-text",
        "longformer",
        "mpnet",
        "roberta",
        "roberta-prelayernorm",
        "xlm-roberta",
        "xlm-roberta-xl",
    }
)
#: Keys a collated batch may hand to a model's forward.
MODEL_INPUT_KEYS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "position_ids",
    "pixel_values",
    "input_values",
    "input_features",
)
_MODALITY_OF_KEY = {
    "input_ids": "text",
    "pixel_values": "image",
    "input_values": "audio",
    "input_features": "audio",
}


def model_type(model: torch.nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def model_name(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(
        getattr(config, "_name_or_path", "")
        or getattr(model, "name_or_path", "")
        or type(model).__name__
    )


def is_decoder(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if model_type(model) in DECODER_TYPES or getattr(config, "is_decoder", False):
        return True
    names = list(getattr(config, "architectures", None) or []) + [type(model).__name__]
    return any(n.endswith("ForCausalLM") or n.endswith("LMHeadModel") for n in names)


def family(model: torch.nn.Module, modality: str) -> str:
    """``"decoder"``, ``"text"``, ``"vision"``, ``"audio"`` or ``"unknown"``."""
    if modality == "text" and is_decoder(model):
        return "decoder"
    if modality in ("text", "image", "audio"):
        return {"text": "text", "image": "vision", "audio": "audio"}[modality]
    return "unknown"


def modality_of(inputs: dict[str, Any]) -> str:
    for key, modality in _MODALITY_OF_KEY.items():
        if key in inputs:
            return modality
    return "unknown"


# ------------------------------------------------------------------- loading
def parse_dtype(dtype: Any, device: torch.device) -> torch.dtype | None:
    """``None``/"auto": bf16 (or fp16) on CUDA, fp32 elsewhere; names or torch dtypes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if str(dtype).lower() not in names:
        raise LOESError(
            f"dtype must be 'auto', 'float32', 'float16', 'bfloat16' or a torch.dtype; got {dtype!r}"
        )
    return names[str(dtype).lower()]


def default_device(device: Any = None) -> torch.device:
    if device is not None and str(device) != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id ("org/name")."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or "\\" in name
        or name.endswith("/")
        or os.path.exists(name)
    )


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host (``$HF_ENDPOINT``) accepts a connection within ``timeout`` seconds."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection(
            (url.hostname or "huggingface.co", url.port or 443), timeout=timeout
        ).close()
        return True
    except OSError:
        return False


def _in_hub_cache(repo_id: str, revision: str | None, repo_type: str = "model") -> bool:
    try:
        hub = require("huggingface_hub", extra="hf")
        found = hub.try_to_load_from_cache(
            repo_id, "config.json", revision=revision, repo_type=repo_type
        )
        return isinstance(found, str)
    except Exception:  # an invalid repo id, an old huggingface_hub
        return False


def check_source(source: str, *, what: str = "model", revision: str | None = None) -> None:
    """Fail fast with a loes message when ``source`` cannot be loaded.

    A local path must exist. A hub id must be in the local cache, or the Hub
    must answer within a few seconds (with ``HF_HUB_OFFLINE`` set, only the
    cache is tried, by the loader itself).
    """
    if looks_like_path(source):
        if not os.path.exists(os.path.expanduser(source)):
            raise LOESError(
                f"{what} path {source!r} does not exist: check the folder or file name "
                f"(a hub id has the form 'org/name')"
            )
        return
    if _offline() or (what == "model" and _in_hub_cache(source, revision)):
        return
    if not hub_reachable():
        raise LOESError(
            f"could not reach the Hugging Face Hub for the {what} id {source!r} (no network, and it "
            "is not in the local cache): download it where there is network and pass the local "
            f"folder or file instead (e.g. huggingface-cli download {source} --local-dir ./{source.split('/')[-1]}),"
            " or set HF_HUB_OFFLINE=1 to use the local cache only"
        )


def load_config(
    source: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
) -> Any:
    """The model config of ``source`` (cheap: no weights), or None when it cannot be read."""
    transformers = require("transformers", extra="hf")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision is not None:
        kwargs["revision"] = revision
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        return transformers.AutoConfig.from_pretrained(source, **kwargs)
    except Exception as e:  # the model load itself reports the problem
        logger.debug("could not read the config of %s before loading: %s", source, e)
        return None


def n_hidden_layers(config: Any) -> int | None:
    """Blocks of the model that is run (hidden states minus the embedding output), if the config says."""
    if config is None or any(hasattr(config, a) for a in ("text_config", "vision_config")):
        return None
    n = getattr(config, "num_hidden_layers", None)
    return n if isinstance(n, int) and n > 0 else None


def position_limit(config: Any) -> int | None:
    """Longest token sequence the model's position embeddings cover, if the config says."""
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    n = getattr(config, "max_position_embeddings", None)
    if not isinstance(n, int) or n <= 0:
        return None
    if str(getattr(config, "model_type", "")) in _OFFSET_POSITIONS:
        n -= int(getattr(config, "pad_token_id", None) or 0) + 1
    return n


def load_model(
    model_id_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    device: Any = None,
    dtype: Any = None,
    gguf_file: str | None = None,
    **model_kwargs: Any,
) -> torch.nn.Module:
    """``AutoModel.from_pretrained`` in eval mode on ``device`` (a hub id or a local folder).

    Decoders load as their base model (no LM head is run). ``gguf_file`` and any
    other keyword pass through to ``from_pretrained``. A missing folder or an
    unreachable hub id is a :class:`~loes.LOESError` before any download is tried.
    """
    transformers = require("transformers", extra="hf")
    source = os.fspath(model_id_or_path)
    check_source(source, revision=revision)
    dev = default_device(device)
    kwargs = dict(model_kwargs)
    if revision is not None:
        kwargs["revision"] = revision
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    kwargs.setdefault("dtype", parse_dtype(dtype, dev))
    placed = kwargs.get("device_map") is not None or kwargs.get("quantization_config") is not None
    logger.info(
        "loading %s (revision=%s, dtype=%s) on %s",
        source,
        revision,
        kwargs["dtype"],
        kwargs.get("device_map") if placed else dev,
    )
    try:
        model = transformers.AutoModel.from_pretrained(
            source, trust_remote_code=trust_remote_code, **kwargs
        )
    except OSError as e:
        raise LOESError(f"could not load a model from {source!r}: {e}") from e
    return (model if placed else model.to(dev)).eval()


def is_placed(model: torch.nn.Module) -> bool:
    """Whether accelerate dispatched the model (``device_map``) or it is quantised: it stays where it is."""
    return bool(getattr(model, "hf_device_map", None)) or bool(
        getattr(model, "is_quantized", False)
    )


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a dispatched model takes its inputs: the first device of its ``hf_device_map``
    that is not ``"disk"`` (accelerate moves them on between parts), else its first parameter's
    (the CPU for weights offloaded to disk)."""
    for where in (getattr(model, "hf_device_map", None) or {}).values():
        if where != "disk":
            return torch.device(f"cuda:{where}" if isinstance(where, int) else where)
    device = next(model.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


#: Files one of which a model folder's tokenizer is loaded from.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


def load_processor(
    source: str,
    modality: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
) -> Any:
    """Tokenizer (text), image processor (image) or feature extractor (audio) of ``source``."""
    transformers = require("transformers", extra="hf")
    cls = {
        "text": transformers.AutoTokenizer,
        "image": transformers.AutoImageProcessor,
        "audio": transformers.AutoFeatureExtractor,
    }[modality]
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision is not None:
        kwargs["revision"] = revision
    if gguf_file is not None and modality == "text":
        kwargs["gguf_file"] = gguf_file
    what = {"text": "tokenizer", "image": "image processor", "audio": "feature extractor"}[modality]
    folder = Path(source)
    if (
        modality == "text"
        and gguf_file is None
        and folder.is_dir()
        and not any((folder / name).exists() for name in TOKENIZER_FILES)
    ):
        # transformers would build an empty tokenizer that maps every text to [UNK]
        raise LOESError(
            f"the model folder {source} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): "
            "pass tokenizer=AutoTokenizer.from_pretrained(...) or save the tokenizer into the folder"
        )
    try:
        return cls.from_pretrained(source, **kwargs)
    except Exception as e:
        raise LOESError(
            f"could not load a {what} for {source!r} ({type(e).__name__}: {e}); pass one "
            f"explicitly, e.g. processor={cls.__name__}.from_pretrained(...)"
        ) from e


def pick_processor(processor: Any, modality: str) -> Any:
    """The part of a multi-modal ``AutoProcessor`` that handles ``modality``."""
    attr = {"text": "tokenizer", "image": "image_processor", "audio": "feature_extractor"}[modality]
    return getattr(processor, attr, None) or processor


# ------------------------------------------------------------------ backbone
@dataclass
class Backbone:
    """The module that is run, the prefix of its layer names and its forward's parameters."""

    module: torch.nn.Module
    prefix: str
    params: tuple[str, ...]
    positional: tuple[str, ...]
    var_kwargs: bool


def backbone(model: torch.nn.Module, modality: str) -> Backbone:
    """The encoder of encoder-decoder models, the tower of dual encoders (CLIP),
    the base model of task heads (``LlamaForCausalLM`` -> ``LlamaModel``)."""
    module, prefix = model, ""
    children = dict(model.named_children())
    config = getattr(model, "config", None)
    if "vision_model" in children and "text_model" in children and modality in ("image", "text"):
        name = "vision_model" if modality == "image" else "text_model"
        module, prefix = children[name], name + "."
    elif getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        module, prefix = model.get_encoder(), "encoder."
    else:
        base = getattr(model, "base_model", model)
        if isinstance(base, torch.nn.Module) and base is not model:
            module = base
    sig = inspect.signature(module.forward)
    params = tuple(sig.parameters)
    positional = tuple(
        n
        for n, p in sig.parameters.items()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    )
    var_kwargs = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    return Backbone(module, prefix, params, positional, var_kwargs)


def forward_kwargs(bb: Backbone, inputs: dict[str, Any], *, decoder: bool) -> dict[str, Any]:
    """Only the inputs the forward accepts, plus the flags that make it return hidden states."""
    kwargs = {k: v for k, v in inputs.items() if k in bb.params}
    dropped = sorted(set(inputs) - set(kwargs))
    if dropped:
        logger.debug(
            "inputs not accepted by %s.forward, dropped: %s", type(bb.module).__name__, dropped
        )
    if decoder and "position_ids" in bb.params and "position_ids" not in kwargs:
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim == 2 and bool((mask[:, 0] == 0).any()):
            # left padding: positions count real tokens only, as generate() does
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    if "output_hidden_states" in bb.params or bb.var_kwargs:
        kwargs["output_hidden_states"] = True
    if "use_cache" in bb.params:
        kwargs["use_cache"] = False
    if "return_dict" in bb.params:
        kwargs["return_dict"] = True
    return kwargs


def hidden_states_of(outputs: Any, module: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    states = getattr(outputs, "hidden_states", None)
    if states is None and isinstance(outputs, dict):
        states = outputs.get("hidden_states")
    if states is None or len(states) == 0:
        raise LOESError(
            f"{type(module).__name__} returned no hidden states when called with "
            "output_hidden_states=True. loes needs a model whose forward returns "
            "`hidden_states` (a tuple of (batch, tokens, dim) tensors, embeddings first): "
            "load it with transformers.AutoModel.from_pretrained(...), or wrap a custom "
            "module so its forward returns an object with a `hidden_states` attribute; "
            "or extract the states yourself and call select_layers_from_custom_embeddings"
        )
    return tuple(states)


def frame_mask(
    module: torch.nn.Module, mask: torch.Tensor | None, n_frames: int
) -> torch.Tensor | None:
    """Mask at the resolution of the states: the input mask itself, or (audio)
    frames from the model's own output lengths."""
    if mask is None:
        return None
    mask = mask.bool()
    if mask.shape[-1] == n_frames:
        return mask
    lengths_fn = getattr(module, "_get_feat_extract_output_lengths", None)
    if lengths_fn is None:
        logger.debug(
            "no way to map a mask of length %d onto %d positions; using all positions",
            mask.shape[-1],
            n_frames,
        )
        return None
    lengths = torch.as_tensor(lengths_fn(mask.sum(-1))).to(mask.device).long()
    return torch.arange(n_frames, device=mask.device)[None, :] < lengths[:, None]
