"""Pooling of per-layer hidden states into one vector per sample.

Every function takes one layer's states and an optional boolean mask and
returns (batch, dim). The masks are at the resolution of the states (tokens,
audio frames); :mod:`loes.hf.extract` derives frame masks from the model's
own output lengths.

``pooling="auto"`` is resolved by :func:`choose_pooling`, which also says why:
a sentence-transformers model's declared pooling (``modules.json`` ->
``1_Pooling/config.json``) wins; otherwise the model family decides.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Any

import torch

from loes._exceptions import LOESError, LOESWarning
from loes._linalg import masked_mean
from loes._progress import find_stacklevel

__all__ = ["POOLINGS", "choose_pooling", "declared_pooling", "pool", "resolve_pooling"]

logger = logging.getLogger(__name__)

#: Pooling names accepted by :func:`pool` ("auto" is resolved first).
POOLINGS = ("cls", "mean", "masked_mean", "max", "last_token")

#: sentence-transformers pooling flags, in the order its ``Pooling`` module
#: concatenates them, with the loes pooling that computes the same vector.
#: ``mean_sqrt_len_tokens`` (sum / sqrt(length)) is a per-row rescaling of the
#: masked mean and is approximated by it; ``weightedmean`` has no loes twin.
_ST_MODES = (
    ("pooling_mode_cls_token", "cls"),
    ("pooling_mode_max_tokens", "max"),
    ("pooling_mode_mean_tokens", "masked_mean"),
    ("pooling_mode_mean_sqrt_len_tokens", "masked_mean"),
    ("pooling_mode_weightedmean_tokens", None),
    ("pooling_mode_lasttoken", "last_token"),
)
_ST_POOLING = "sentence_transformers.models.Pooling"

#: Text encoders whose first token is a sentence-level [CLS]/<s> token.
TEXT_CLS_TYPES = frozenset(
    {
        "albert",
        "bert",
        "camembert",
        "deberta",
        "deberta-v2",
        "distilbert",
        "electra",
        "ernie",
        "megatron-bert",
        "modernbert",
        "mpnet",
        "nomic_bert",
        "roberta",
        "roberta-prelayernorm",
        "roformer",
        "xlm-roberta",
        "xlm-roberta-xl",
    }
)
#: Vision transformers with a class token at position 0.
VIT_CLS_TYPES = frozenset(
    {
        "beit",
        "clip_vision_model",
        "data2vec-vision",
        "deit",
        "dinov2",
        "dinov2_with_registers",
        "dinov3_vit",
        "vit",
        "vit_msn",
    }
)


def _st_file(source: str, filename: str, revision: str | None) -> str | None:
    """Local path of ``filename`` in a model folder or hub repo (None when it has none)."""
    folder = os.path.expanduser(source)
    if os.path.isdir(folder):
        path = os.path.join(folder, filename)
        return path if os.path.isfile(path) else None
    if os.path.exists(folder):  # a single file (e.g. GGUF): no sentence-transformers modules
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
        from transformers.utils import cached_file

        hit = try_to_load_from_cache(source, filename, revision=revision)
        if isinstance(hit, str):
            return hit
        if hit is not None:  # cached as absent
            return None
        return cached_file(
            source,
            filename,
            revision=revision,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            _raise_exceptions_for_gated_repo=False,
        )
    except Exception as e:  # not a hub id, no network: no declared pooling
        logger.debug("no %s for %s: %s", filename, source, e)
        return None


def declared_pooling(source: str | None, revision: str | None = None) -> dict[str, Any] | None:
    """The pooling a sentence-transformers model declares, read from its folder or hub repo.

    Parameters
    ----------
    source : str, optional
        Model folder or hub id (a loaded model's ``config._name_or_path``).
    revision : str, optional

    Returns
    -------
    dict or None
        ``{"file": "1_Pooling/config.json", "modes": [flags set], "pooling": loes name
        or None}``; None when ``source`` has no ``modules.json`` with a
        ``sentence_transformers.models.Pooling`` module (or its config cannot be read).
    """
    if not source:
        return None
    modules_path = _st_file(source, "modules.json", revision)
    if modules_path is None:
        return None
    try:
        with open(modules_path, encoding="utf-8") as f:
            modules = json.load(f)
        entry = next(m for m in modules if str(m.get("type", "")).startswith(_ST_POOLING))
        rel = "/".join(p for p in (str(entry.get("path", "")).strip("/"), "config.json") if p)
        config_path = _st_file(source, rel, revision)
        if config_path is None:
            return None
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError, StopIteration, AttributeError, TypeError) as e:
        logger.debug("could not read the sentence-transformers pooling of %s: %s", source, e)
        return None
    modes = [flag for flag, _ in _ST_MODES if config.get(flag)]
    names = {dict(_ST_MODES)[flag] for flag in modes}
    return {"file": rel, "modes": modes, "pooling": names.pop() if len(names) == 1 else None}


def choose_pooling(
    pooling: str,
    family: str,
    model_type: str,
    state_ndim: int = 3,
    *,
    source: str | None = None,
    revision: str | None = None,
    module: str | None = None,
) -> tuple[str, str]:
    """The concrete pooling for ``pooling`` and the reason for it.

    ``"auto"`` resolves, in this order:

    1. 4-D states (CNN stages, (B, C, H, W)): ``"mean"`` over space (always).
    2. A sentence-transformers model (``modules.json`` in ``source`` naming a
       ``Pooling`` module): its declared pooling -- mean tokens (and mean-sqrt-len)
       -> ``"masked_mean"``, cls token -> ``"cls"``, max tokens -> ``"max"``,
       last token -> ``"last_token"``. Weighted mean, or several modes at once
       (concatenated by sentence-transformers), have no loes twin: a
       :class:`~loes.LOESWarning` says so and ``"masked_mean"`` is used.
    3. Otherwise the family: ``"last_token"`` for decoders, ``"cls"`` for text
       encoders and vision transformers with a class token, ``"masked_mean"`` for
       audio frames, encoders without a class token and unknown models.

    Parameters
    ----------
    pooling : str
        ``"auto"`` or a name in :data:`POOLINGS` (``"avg"``/``"average"`` mean ``"mean"``).
    family, model_type : str
        From :mod:`loes.hf._models` (``"text"``, ``"decoder"``, ``"vision"``, ``"audio"``).
    state_ndim : int
        Dimensions of the hidden states (3: tokens, 4: CNN maps).
    source : str, optional
        Model folder or hub id, read for a sentence-transformers pooling config.
    module : str, optional
        Class name of the module run (e.g. ``"LlamaModel"``), quoted in the reason.

    Returns
    -------
    (str, str)
        The pooling name and a one-line reason, e.g.
        ``("masked_mean", "masked_mean: from the model's sentence-transformers pooling
        config 1_Pooling/config.json (pooling_mode_mean_tokens)")``.
    """
    name = str(pooling).lower()
    if name == "avg" or name == "average":
        name = "mean"
    if name not in POOLINGS and name != "auto":
        raise LOESError(f"pooling must be 'auto' or one of {list(POOLINGS)}; got {pooling!r}")
    if state_ndim == 4:
        if name in ("cls", "last_token"):
            raise LOESError(
                f"pooling={name!r} needs token states, but this model's hidden states are 4-D "
                "(batch, channels, height, width): use pooling='auto' or 'mean' (spatial mean)"
            )
        return "mean", "mean: 4-D states (batch, channels, height, width) are averaged over space"
    if name != "auto":
        return name, f"{name}: requested"
    what = f" ({module})" if module else (f" ({model_type})" if model_type else "")
    st = declared_pooling(source, revision)
    if st is not None and st["pooling"] is not None:
        modes = ", ".join(st["modes"])
        chosen, reason = (
            st["pooling"],
            (
                f"{st['pooling']}: from the model's sentence-transformers "
                f"pooling config {st['file']} ({modes})"
            ),
        )
        if "pooling_mode_mean_sqrt_len_tokens" in st["modes"]:
            reason += "; its sum / sqrt(length) is the masked mean up to a per-row scale"
    elif st is not None:
        modes = ", ".join(st["modes"]) or "no mode set"
        warnings.warn(
            f"the model's sentence-transformers pooling config {st['file']} asks for {modes}, "
            "which loes cannot reproduce (it pools one way: cls, mean, masked_mean, max or "
            "last_token); using masked_mean. Pass pooling=... to choose another",
            LOESWarning,
            stacklevel=find_stacklevel(),
        )
        chosen = "masked_mean"
        reason = f"masked_mean: fallback, {st['file']} asks for {modes} (not supported)"
    elif family == "decoder":
        chosen, reason = "last_token", f"last_token: decoder{what}"
    elif family == "text" and model_type in TEXT_CLS_TYPES:
        chosen, reason = "cls", f"cls: text encoder with a class token{what}"
    elif family == "vision" and model_type in VIT_CLS_TYPES:
        chosen, reason = "cls", f"cls: vision transformer with a class token{what}"
    elif family == "audio":
        chosen, reason = "masked_mean", f"masked_mean: audio frames{what}"
    else:
        chosen, reason = "masked_mean", f"masked_mean: encoder without a class token{what}"
    logger.info("pooling %s", reason)
    return chosen, reason


def resolve_pooling(
    pooling: str, family: str, model_type: str, state_ndim: int = 3, *, source: str | None = None
) -> str:
    """The concrete pooling name of :func:`choose_pooling` (without the reason)."""
    return choose_pooling(pooling, family, model_type, state_ndim, source=source)[0]


def pool(state: torch.Tensor, mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """Pool one layer's states to (batch, dim), accumulating in float32.

    Parameters
    ----------
    state : tensor of shape (batch, tokens, dim), (batch, channels, height, width)
        or (batch, dim)
    mask : bool tensor of shape (batch, tokens), optional
        True at real tokens/frames. ``None`` means every position is real.
    pooling : {"cls", "mean", "masked_mean", "max", "last_token"}
        ``"mean"`` averages every position (padding included, as the published
        code does); ``"masked_mean"`` only real ones; ``"max"`` is the
        element-wise max over real positions (padding never wins);
        ``"last_token"`` takes the last real position whatever the padding
        side. 4-D states are averaged over height and width.

    Returns
    -------
    tensor of shape (batch, dim), float32
    """
    if state.ndim == 2:
        return state.float()
    if state.ndim == 4:
        return state.mean(dim=(2, 3), dtype=torch.float32)
    if state.ndim != 3:
        raise LOESError(f"hidden states must be 2-, 3- or 4-D; got shape {tuple(state.shape)}")
    if pooling == "cls":
        return state[:, 0].float()
    if pooling in ("mean", "masked_mean"):
        return masked_mean(state, mask if pooling == "masked_mean" else None, dtype=torch.float32)
    if pooling == "max":
        if mask is None:
            return state.amax(dim=1).float()
        m = mask.to(device=state.device, dtype=torch.bool).unsqueeze(-1)
        low = torch.full((), float("-inf"), dtype=state.dtype, device=state.device)
        out = torch.where(m, state, low).amax(dim=1)
        return torch.where(m.any(dim=1), out, out.new_zeros(())).float()
    if pooling == "last_token":
        if mask is None:
            return state[:, -1].float()
        m = mask.to(device=state.device, dtype=torch.bool)
        pos = torch.arange(m.shape[1], device=state.device)
        last = torch.where(m, pos, torch.full_like(pos, -1)).amax(dim=1).clamp(min=0)
        return state[torch.arange(state.shape[0], device=state.device), last].float()
    raise LOESError(f"pooling must be one of {list(POOLINGS)}; got {pooling!r}")
