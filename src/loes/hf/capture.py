"""Keep only the requested hidden states: hooks on the model's blocks, and an early stop.

A Hugging Face model built as a stack of blocks returns ``hidden_states[h]`` =
the input of block ``h`` for ``h < n_blocks`` (``h = 0``: the embedding output)
and ``hidden_states[n_blocks]`` = the stack's final output (after a final norm
in some families: GPT-2, Llama, T5, Whisper, ...). :class:`LayerCapture` puts a
forward pre-hook on each requested block, hands its input to a ``keep`` function
(e.g. pooling) at once, and raises a private exception from the hook of the
deepest requested block, so blocks past it never run: layers ``[3, 7, 12]``
(index 0 = first block) of a 32-block model run 13 blocks. The final state is
taken from the last block's output or the stack's output, whichever equals the
model's own ``hidden_states[-1]``.

Before the first batch, one row is run with ``output_hidden_states=True`` and the
hooks, and every captured state is compared with the model's own; on any
mismatch (or when no block list is found) the run falls back to the full
forward and slices the returned states, so the features are right either way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from loes._exceptions import LOESError
from loes.hf._models import hidden_states_of
from loes.layers import resolve_layers

__all__ = ["LayerCapture", "check_layer_spec", "find_blocks", "slice_rows"]

logger = logging.getLogger(__name__)

#: Names of the ModuleList that holds a model's blocks (BERT, Llama, GPT-2, T5, ConvNeXt, ...).
_BLOCK_NAMES = frozenset({"layer", "layers", "h", "block", "blocks", "stages"})
#: Hidden-state specs that need features to resolve: not usable before extraction.
NEEDS_EMBEDDINGS = frozenset({"loes", "auto", "fast_auto"})


def check_layer_spec(spec: Any) -> None:
    """A :class:`~loes.LOESError` for a layer spec that is malformed or needs features."""
    if isinstance(spec, str) and spec.strip().lower() in NEEDS_EMBEDDINGS:
        raise LOESError(
            f"layers={spec!r} needs the features of every layer: extract them (layers=None), then "
            "pick with loes.layers.resolve_layers; layers= takes ints, lists, 'first', 'middle', "
            "'last', 'all' or 'sweep:...'"
        )
    resolve_layers(spec, 1 << 20)  # syntax only: the range is checked against the model


class _Stop(Exception):
    """Raised by the hook of the deepest requested block to end the forward pass there."""


def find_blocks(module: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.ModuleList] | None:
    """(the module that owns the block list, the block list), or None.

    The block list is the shallowest ``ModuleList`` named ``layer(s)``, ``h``,
    ``block(s)`` or ``stages`` whose children share one class.
    """
    best: tuple[int, str, torch.nn.ModuleList] | None = None
    for name, m in module.named_modules():
        if (
            isinstance(m, torch.nn.ModuleList)
            and len(m) > 0
            and name.rsplit(".", 1)[-1] in _BLOCK_NAMES
            and len({type(c) for c in m}) == 1
        ):
            depth = name.count(".")
            if best is None or depth < best[0]:
                best = (depth, name, m)
    if best is None:
        return None
    parent = best[1].rsplit(".", 1)[0] if "." in best[1] else ""
    return module.get_submodule(parent), best[2]


def slice_rows(kwargs: dict[str, Any], start: int, stop: int, n_rows: int) -> dict[str, Any]:
    """Rows ``start:stop`` of every tensor in ``kwargs`` whose first axis has ``n_rows`` entries."""
    return {
        k: (v[start:stop] if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n_rows else v)
        for k, v in kwargs.items()
    }


def _tensor_of(output: Any) -> torch.Tensor | None:
    """The hidden-state tensor of a block's or a stack's output."""
    if torch.is_tensor(output):
        return output
    h = getattr(output, "last_hidden_state", None)
    if torch.is_tensor(h):
        return h
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    return None


def _close(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return (
        a is not None
        and a.shape == b.shape
        and torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)
    )


class LayerCapture:
    """Runs a backbone keeping ``keep(h, hidden_states[h])`` for the requested layers only.

    Parameters
    ----------
    module : torch.nn.Module
        The module that is run (the backbone).
    layers : layer spec or None
        Anything :func:`loes.layers.resolve_layers` accepts without features
        (ints, negative ints, lists, ``"last"``, ``"middle"``, ``"all"``, ...);
        ``None``: every layer (the full forward, as before).
    include_embeddings : bool
        Layer index 0 is the embedding output (else the first block).
    """

    def __init__(self, module: torch.nn.Module, layers: Any, *, include_embeddings: bool) -> None:
        self.module = module
        self.spec = layers
        self.first = 0 if include_embeddings else 1
        found = find_blocks(module) if layers is not None else None
        self.owner, self.blocks = found if found is not None else (None, None)
        self.states: list[int] | None = None
        self.hooked = False
        self.final = "block"

    def resolve(self, n_states: int) -> list[int]:
        """Hidden-state indices (sorted, unique) of the requested layers, for ``n_states`` states."""
        n_layers = n_states - self.first
        if n_layers < 1:
            raise LOESError(
                f"the model returned {n_states} hidden state(s); no block outputs to select from"
            )
        idx = range(n_layers) if self.spec is None else resolve_layers(self.spec, n_layers)
        return sorted({int(i) + self.first for i in idx})

    def prepare(self, kwargs: dict[str, Any], n_rows: int) -> None:
        """Resolve the layers and check the hooks on the first row of the first batch."""
        if self.blocks is None:
            return
        self.states = self.resolve(len(self.blocks) + 1)
        self.hooked = self._check(slice_rows(kwargs, 0, 1, n_rows))
        if not self.hooked:
            logger.debug(
                "hooks on %s do not reproduce its hidden_states: running the full forward",
                type(self.module).__name__,
            )

    def _check(self, kwargs: dict[str, Any]) -> bool:
        n = len(self.blocks)
        got: dict[Any, Any] = {}
        handles = [
            self.blocks[h].register_forward_pre_hook(
                self._pre(got, h, lambda h, x: x, None), with_kwargs=True
            )
            for h in self.states
            if h < n
        ]
        handles.append(
            self.blocks[-1].register_forward_hook(
                lambda m, a, o: got.__setitem__("block", _tensor_of(o))
            )
        )
        handles.append(
            self.owner.register_forward_hook(
                lambda m, a, o: got.__setitem__("owner", _tensor_of(o))
            )
        )
        try:
            ref = hidden_states_of(self.module(**kwargs), self.module)
        finally:
            for handle in handles:
                handle.remove()
        if len(ref) != n + 1 or not all(_close(got.get(h), ref[h]) for h in self.states if h < n):
            return False
        for source in ("block", "owner"):
            if _close(got.get(source), ref[n]):
                self.final = source
                return True
        return n not in self.states

    @staticmethod
    def _pre(
        got: dict[Any, Any], h: int, keep: Callable[[int, torch.Tensor], Any], stop: int | None
    ) -> Callable:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            got[h] = keep(h, args[0] if args else kwargs["hidden_states"])
            if h == stop:
                raise _Stop

        return hook

    def run(self, kwargs: dict[str, Any], keep: Callable[[int, torch.Tensor], Any]) -> list[Any]:
        """One forward; ``[keep(h, hidden_states[h]) for h in self.states]``.

        ``kwargs`` are the backbone's inputs with ``output_hidden_states=True``.
        """
        if not self.hooked:
            states = hidden_states_of(self.module(**kwargs), self.module)
            if self.states is None:
                self.states = self.resolve(len(states))
            return [keep(h, states[h]) for h in self.states]
        n = len(self.blocks)
        got: dict[Any, Any] = {}
        stop = max(self.states) if max(self.states) < n else None
        handles = [
            self.blocks[h].register_forward_pre_hook(
                self._pre(got, h, keep, stop), with_kwargs=True
            )
            for h in self.states
            if h < n
        ]
        if n in self.states:
            target = self.blocks[-1] if self.final == "block" else self.owner
            handles.append(
                target.register_forward_hook(
                    lambda m, a, o: got.__setitem__(n, keep(n, _tensor_of(o)))
                )
            )
        try:
            self.module(
                **(
                    {**kwargs, "output_hidden_states": False}
                    if "output_hidden_states" in kwargs
                    else kwargs
                )
            )
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return [got[h] for h in self.states]
