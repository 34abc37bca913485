"""Token-level metrics over a stream of batches, with bounded memory."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from loes._exceptions import LOESError
from loes._linalg import as_float, masked_mean
from loes.metrics._entropy import prompt_entropy
from loes.metrics._geometry import curvature

__all__ = ["TOKEN_METRICS", "TokenMetricAccumulator", "split_batch"]

#: Metrics computed from token states, in report order.
TOKEN_METRICS = ("prompt_entropy", "curvature")


def split_batch(item: Any) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Per-layer (B, T, D) states and the (B, T) mask from one stream item.

    Accepts ``(states, mask)`` tuples, dicts with ``"hidden_states"`` and
    ``"attention_mask"`` (or ``"mask"``), or objects with those attributes;
    ``states`` is a (B, L, T, D) tensor or a sequence of L (B, T, D) tensors.
    """
    if isinstance(item, dict):
        states = item.get("hidden_states", item.get("states"))
        mask = item.get("attention_mask", item.get("mask"))
    elif isinstance(item, (tuple, list)) and len(item) == 2 and not _is_state(item[1]):
        states, mask = item
    elif hasattr(item, "hidden_states"):
        states = item.hidden_states
        mask = getattr(item, "attention_mask", getattr(item, "mask", None))
    else:
        states, mask = item, None
    if states is None:
        raise LOESError(
            "a token batch needs hidden states: pass (states, mask) or a dict with 'hidden_states'"
        )
    if isinstance(states, (list, tuple)):
        layers = list(states)
    else:
        t = states if isinstance(states, torch.Tensor) else torch.as_tensor(states)
        if t.ndim != 4:
            raise LOESError(
                "token states must be a (batch, layers, tokens, dim) tensor or a list of "
                f"(batch, tokens, dim) tensors, one per layer; got shape {tuple(t.shape)}"
            )
        layers = [t[:, i] for i in range(t.shape[1])]
    if mask is not None and not isinstance(mask, torch.Tensor):
        mask = torch.as_tensor(mask)
    return layers, mask


def _is_state(x: Any) -> bool:
    return isinstance(x, (list, tuple)) or (hasattr(x, "ndim") and x.ndim >= 3)


class TokenMetricAccumulator:
    """Accumulate prompt entropy, curvature and mean-pooled states batch by batch.

    Memory is one batch of token states plus, with ``keep_pooled=True``, the
    (n_samples, n_layers, dim) mean-pooled states (the size of an ordinary
    pooled extraction), so dataset-level metrics can follow.

    Parameters
    ----------
    alpha : float
        Rényi order of the prompt entropy.
    normalize : bool
        Normalised prompt entropy (see :func:`loes.metrics.prompt_entropy`).
    keep_pooled : bool
        Keep masked-mean pooled states for :meth:`pooled`.

    Examples
    --------
    >>> import torch
    >>> acc = TokenMetricAccumulator()
    >>> g = torch.Generator().manual_seed(0)
    >>> for _ in range(3):
    ...     acc.update(torch.randn(4, 2, 6, 8, generator=g), torch.ones(4, 6))
    >>> sorted(acc.compute()), acc.pooled().shape
    (['curvature', 'prompt_entropy'], torch.Size([12, 2, 8]))
    """

    def __init__(self, alpha: float = 1.0, normalize: bool = True, keep_pooled: bool = True):
        self.alpha = alpha
        self.normalize = normalize
        self.keep_pooled = keep_pooled
        self._sums: dict[str, list[float]] = {}
        self._counts: dict[str, list[int]] = {}
        self._pooled: list[torch.Tensor] = []
        self.n_layers: int | None = None
        self.n_samples = 0

    def update(
        self, states: torch.Tensor | Sequence[torch.Tensor], mask: Any | None = None
    ) -> None:
        """Add one batch: (B, L, T, D) states or L tensors of (B, T, D); mask (B, T)."""
        layers, mask = split_batch((states, mask) if mask is not None else states)
        if self.n_layers is None:
            self.n_layers = len(layers)
            for name in TOKEN_METRICS:
                self._sums[name] = [0.0] * self.n_layers
                self._counts[name] = [0] * self.n_layers
        elif len(layers) != self.n_layers:
            raise LOESError(f"batch has {len(layers)} layers; earlier batches had {self.n_layers}")
        pooled = []
        for i, layer in enumerate(layers):
            z = as_float(layer.detach().cpu())
            m = None if mask is None else mask.detach().cpu()
            values = {
                "prompt_entropy": prompt_entropy(
                    z, m, self.alpha, normalize=self.normalize, reduction="none"
                ),
                "curvature": curvature(z, m, reduction="none"),
            }
            for name, v in values.items():
                ok = ~torch.isnan(v)
                self._sums[name][i] += float(v[ok].sum())
                self._counts[name][i] += int(ok.sum())
            if self.keep_pooled:
                pooled.append(masked_mean(z, m))
        if self.keep_pooled:
            self._pooled.append(torch.stack(pooled, 1).float())
        self.n_samples += layers[0].shape[0]

    def consume(self, stream: Iterable[Any]) -> TokenMetricAccumulator:
        """Update from every item of a stream (see :func:`split_batch`); returns self."""
        for item in stream:
            layers, mask = split_batch(item)
            self.update(layers, mask)
        return self

    def compute(self) -> dict[str, list[float]]:
        """Mean prompt entropy and curvature per layer (NaN where undefined)."""
        if self.n_layers is None:
            raise LOESError("no token batches were added: call update() or consume() first")
        return {
            name: [
                s / c if c else float("nan") for s, c in zip(self._sums[name], self._counts[name])
            ]
            for name in TOKEN_METRICS
        }

    def pooled(self) -> torch.Tensor:
        """Masked-mean pooled states of every sample seen, (n_samples, n_layers, dim)."""
        if not self.keep_pooled:
            raise LOESError(
                "pooled states were not kept: create the accumulator with keep_pooled=True"
            )
        if not self._pooled:
            raise LOESError("no token batches were added")
        return torch.cat(self._pooled, 0)
