"""Pooling of per-layer hidden states into one vector per sample.

Every function takes one layer's states and an optional boolean mask and
returns (batch, dim). The masks are at the resolution of the states (tokens,
audio frames); :mod:`loes.hf.extract` derives frame masks from the model's
own output lengths.
"""

from __future__ import annotations

from typing import Optional

import torch

from loes._exceptions import LOESError
from loes._linalg import masked_mean

__all__ = ["POOLINGS", "pool", "resolve_pooling"]

#: Pooling names accepted by :func:`pool` ("auto" is resolved first).
POOLINGS = ("cls", "mean", "masked_mean", "last_token")

#: Text encoders whose first token is a sentence-level [CLS]/<s> token.
TEXT_CLS_TYPES = frozenset({
    "albert", "bert", "camembert", "deberta", "deberta-v2", "distilbert", "electra",
    "ernie", "megatron-bert", "modernbert", "mpnet", "nomic_bert", "roberta",
    "roberta-prelayernorm", "roformer", "xlm-roberta", "xlm-roberta-xl",
})
#: Vision transformers with a class token at position 0.
VIT_CLS_TYPES = frozenset({
    "beit", "clip_vision_model", "data2vec-vision", "deit", "dinov2",
    "dinov2_with_registers", "dinov3_vit", "vit", "vit_msn",
})


def resolve_pooling(pooling: str, family: str, model_type: str, state_ndim: int = 3) -> str:
    """The concrete pooling for ``pooling`` (``"auto"`` or a name in :data:`POOLINGS`).

    ``"auto"``: ``"cls"`` for text encoders and vision transformers with a class
    token, ``"last_token"`` for decoders, ``"masked_mean"`` for audio frames,
    encoders without a class token and unknown models. 4-D states (CNN stages,
    (B, C, H, W)) are always averaged over space (``"mean"``).
    """
    name = str(pooling).lower()
    if name == "avg" or name == "average":
        name = "mean"
    if name not in POOLINGS and name != "auto":
        raise LOESError(
            f"pooling must be 'auto' or one of {list(POOLINGS)}; got {pooling!r}"
        )
    if state_ndim == 4:
        if name in ("cls", "last_token"):
            raise LOESError(
                f"pooling={name!r} needs token states, but this model's hidden states are 4-D "
                "(batch, channels, height, width): use pooling='auto' or 'mean' (spatial mean)"
            )
        return "mean"
    if name != "auto":
        return name
    if family == "decoder":
        return "last_token"
    if family == "text" and model_type in TEXT_CLS_TYPES:
        return "cls"
    if family == "vision" and model_type in VIT_CLS_TYPES:
        return "cls"
    return "masked_mean"


def pool(state: torch.Tensor, mask: Optional[torch.Tensor], pooling: str) -> torch.Tensor:
    """Pool one layer's states to (batch, dim), accumulating in float32.

    Parameters
    ----------
    state : tensor of shape (batch, tokens, dim), (batch, channels, height, width)
        or (batch, dim)
    mask : bool tensor of shape (batch, tokens), optional
        True at real tokens/frames. ``None`` means every position is real.
    pooling : {"cls", "mean", "masked_mean", "last_token"}
        ``"mean"`` averages every position (padding included, as the published
        code does); ``"masked_mean"`` only real ones; ``"last_token"`` takes the
        last real position whatever the padding side. 4-D states are averaged
        over height and width.

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
    if pooling == "last_token":
        if mask is None:
            return state[:, -1].float()
        m = mask.to(device=state.device, dtype=torch.bool)
        pos = torch.arange(m.shape[1], device=state.device)
        last = torch.where(m, pos, torch.full_like(pos, -1)).amax(dim=1).clamp(min=0)
        return state[torch.arange(state.shape[0], device=state.device), last].float()
    raise LOESError(f"pooling must be one of {list(POOLINGS)}; got {pooling!r}")
