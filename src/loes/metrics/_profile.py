"""Every metric for every layer: :func:`profile` and :class:`MetricProfile`."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from loes._deps import require
from loes._exceptions import LOESError
from loes._json import to_jsonable
from loes._linalg import isotropy
from loes._progress import ProgressSetting, progress
from loes._validation import check_embeddings
from loes.metrics._entropy import dataset_entropy, effective_rank, rankme
from loes.metrics._geometry import cka_matrix, twonn_dimension
from loes.metrics._tokens import TokenMetricAccumulator
from loes.metrics._views import dime, infonce, lidar

__all__ = ["METRICS", "MetricProfile", "MetricSpec", "layer_metrics", "profile"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetricSpec:
    """A metric's name, what it needs and which direction the selector prefers.

    ``direction`` is the *default* for "best layer by metric": it follows the
    metric's source paper, not a measured law (see docs/metrics.md for how
    often each direction beat the last layer).
    """

    name: str
    source: str  # "pooled", "tokens" or "views"
    direction: str  # "higher" or "lower"
    description: str


METRICS: dict[str, MetricSpec] = {
    m.name: m
    for m in [
        MetricSpec(
            "prompt_entropy",
            "tokens",
            "lower",
            "normalised α-entropy of each prompt's token Gram matrix (compression)",
        ),
        MetricSpec(
            "curvature", "tokens", "lower", "mean turning angle of token trajectories (radians)"
        ),
        MetricSpec(
            "dataset_entropy",
            "pooled",
            "higher",
            "normalised α-entropy of the pooled sample Gram matrix",
        ),
        MetricSpec(
            "effective_rank", "pooled", "higher", "exp entropy of the singular values (centred)"
        ),
        MetricSpec("rankme", "pooled", "higher", "RankMe: effective rank of the raw embeddings"),
        MetricSpec(
            "isotropy",
            "pooled",
            "higher",
            "normalised participation ratio of the covariance, in [0, 1]",
        ),
        MetricSpec("twonn", "pooled", "lower", "TwoNN intrinsic dimension"),
        MetricSpec("infonce", "views", "lower", "InfoNCE loss between two augmented views"),
        MetricSpec(
            "lidar", "views", "higher", "effective rank of the LDA matrix over augmented views"
        ),
        MetricSpec(
            "dime", "views", "higher", "DiME mutual-information estimate between two views (nats)"
        ),
    ]
}


@dataclass
class MetricProfile:
    """Per-layer metric values.

    Attributes
    ----------
    values : dict of str to list of float
        One value per layer for every metric that could be computed.
    directions : dict of str to str
        ``"higher"`` or ``"lower"``: which end the selector prefers.
    layer_names : list of str, optional
    cka : torch.Tensor of shape (n_layers, n_layers), optional
        Layer × layer linear CKA of the pooled embeddings.
    config : dict
        Settings used (alpha, temperature, random_state, ...).
    """

    values: dict[str, list[float]]
    directions: dict[str, str]
    layer_names: list[str] | None = None
    cka: torch.Tensor | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(next(iter(self.values.values()))) if self.values else 0

    @property
    def metrics(self) -> list[str]:
        return list(self.values)

    def best_layer(self, metric: str, direction: str | None = None) -> int:
        """The layer with the highest (or lowest) value of ``metric``."""
        return self.ranking(metric, direction)[0]

    def ranking(self, metric: str, direction: str | None = None) -> list[int]:
        """Layers from best to worst by ``metric`` in ``direction`` (NaN last)."""
        if metric not in self.values:
            raise LOESError(f"metric {metric!r} was not computed; available: {self.metrics}")
        direction = _check_direction(direction or self.directions[metric])
        sign = 1.0 if direction == "lower" else -1.0
        vals = self.values[metric]
        return sorted(
            range(len(vals)),
            key=lambda i: (
                math.isnan(vals[i]),
                sign * vals[i] if not math.isnan(vals[i]) else 0.0,
                i,
            ),
        )

    def table(self) -> str:
        """A plain-text table: one row per layer, one column per metric."""
        names = self.metrics
        width = max([12] + [len(n) + 1 for n in names])
        head = f"{'layer':<18}" + "".join(f"{n:>{width}}" for n in names)
        arrows = f"{'(better)':<18}" + "".join(
            f"{('↑' if self.directions[n] == 'higher' else '↓'):>{width}}" for n in names
        )
        lines = [head, arrows]
        for i in range(self.n_layers):
            label = self.layer_names[i] if self.layer_names else str(i)
            row = "".join(f"{self.values[n][i]:>{width}.4f}" for n in names)
            lines.append(f"{label:<18}{row}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A strict-JSON dict (:mod:`loes._json`: a NaN value as None)."""
        return to_jsonable(
            {
                "values": self.values,
                "directions": self.directions,
                "layer_names": self.layer_names,
                "cka": self.cka,
                "config": self.config,
            }
        )

    def to_frame(self):
        """A pandas DataFrame with one row per layer."""
        import pandas as pd

        df = pd.DataFrame(self.values)
        df.index.name = "layer"
        if self.layer_names:
            df.insert(0, "name", self.layer_names)
        return df

    def plot(self, path: str | None = None, *, title: str | None = None):
        """One panel per metric across layers, plus the CKA heat map.

        Needs matplotlib (``pip install 'loes[plot]'``). Returns a
        :class:`matplotlib.figure.Figure` (no pyplot state, no backend
        switch); writes it to ``path`` (e.g. a PNG) when given.
        """
        figure = require("matplotlib.figure", extra="plot", package="matplotlib")
        names = self.metrics
        panels = len(names) + (self.cka is not None)
        cols = min(4, max(panels, 1))
        rows = math.ceil(panels / cols)
        fig = figure.Figure(figsize=(3.6 * cols, 2.9 * rows), layout="tight")
        axes = fig.subplots(rows, cols, squeeze=False)
        layers = list(range(self.n_layers))
        for ax, name in zip(axes.flat, names):
            vals = self.values[name]
            ax.plot(layers, vals, marker="o", lw=1.5)
            best = self.best_layer(name)
            ax.plot([best], [vals[best]], marker="*", ms=14, color="tab:red", ls="none")
            arrow = "higher" if self.directions[name] == "higher" else "lower"
            ax.set_title(f"{name} ({arrow} better)", fontsize=9)
            ax.set_xlabel("layer", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        used = len(names)
        if self.cka is not None:
            ax = axes.flat[used]
            im = ax.imshow(self.cka.numpy(), vmin=0, vmax=1, cmap="viridis", origin="lower")
            ax.set_title("linear CKA (layer × layer)", fontsize=9)
            ax.set_xlabel("layer", fontsize=8)
            ax.set_ylabel("layer", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.046)
            used += 1
        for ax in list(axes.flat)[used:]:
            ax.axis("off")
        if title:
            fig.suptitle(title)
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


def _check_direction(direction: str) -> str:
    if direction not in ("higher", "lower"):
        raise LOESError(f"direction must be 'higher' or 'lower'; got {direction!r}")
    return direction


def _as_view_layers(views: Any, n_layers: int | None) -> list[list[torch.Tensor]]:
    """Views given as q embeddings (each (N, L, D) or a list of L layers) -> [layer][view]."""
    if isinstance(views, torch.Tensor) or hasattr(views, "ndim"):
        views = list(views)
    if not isinstance(views, (list, tuple)) or len(views) < 2:
        raise LOESError(
            "views must be a list of at least 2 embeddings of shape (n_samples, n_layers, dim), "
            "one per augmented view"
        )
    per_view = [check_embeddings(v) for v in views]
    lens = {len(v) for v in per_view}
    if len(lens) != 1 or (n_layers is not None and lens != {n_layers}):
        raise LOESError(
            f"every view must have the same number of layers as the embeddings; got {sorted(lens)}"
        )
    return [[v[i] for v in per_view] for i in range(len(per_view[0]))]


def profile(
    embeddings: Any = None,
    *,
    tokens: Any = None,
    views: Any = None,
    metrics: Sequence[str] | None = None,
    alpha: float = 1.0,
    temperature: float = 0.1,
    n_permutations: int = 5,
    random_state: int = 0,
    with_cka: bool = True,
    layer_names: Sequence[str] | None = None,
    show_progress: ProgressSetting = "auto",
) -> MetricProfile:
    """Compute every applicable metric for every layer.

    Parameters
    ----------
    embeddings : array of shape (n_samples, n_layers, dim) or list of layers, optional
        Pooled states: dataset entropy, effective rank, RankMe, isotropy,
        TwoNN and the CKA matrix.
    tokens : optional
        Token states for prompt entropy and curvature: a filled
        :class:`TokenMetricAccumulator`, a ``(states, mask)`` pair with
        states of shape (batch, n_layers, tokens, dim), or an iterable of such
        batches (e.g. ``loes.hf.iter_hidden_states(...)``), consumed with
        bounded memory. When ``embeddings`` is None the masked-mean pooled
        token states stand in for it.
    views : list of q >= 2 embeddings of shape (n_samples, n_layers, dim), optional
        Augmented views of the same samples: InfoNCE and DiME (first two
        views) and LiDAR (all views).
    metrics : list of str, optional
        Restrict to these names (see :data:`METRICS`); default all applicable.
    alpha : float
        Rényi order of the entropies.
    temperature : float
        InfoNCE temperature.
    n_permutations, random_state
        DiME's sample permutations.
    with_cka : bool
        Also compute the layer × layer CKA matrix of the pooled states.

    Returns
    -------
    MetricProfile

    Examples
    --------
    >>> import torch
    >>> x = torch.randn(300, 4, 16, generator=torch.Generator().manual_seed(0))
    >>> x[:, 3] = x[:, 3, :1]          # layer 3 collapses onto one direction
    >>> p = profile(x, metrics=["effective_rank", "isotropy"], show_progress=False)
    >>> p.ranking("effective_rank")[-1]
    3
    """
    wanted = list(metrics) if metrics is not None else list(METRICS)
    unknown = [m for m in wanted if m not in METRICS]
    if unknown:
        raise LOESError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")
    if embeddings is None and tokens is None and views is None:
        raise LOESError("profile needs embeddings, tokens or views")
    values: dict[str, list[float]] = {}

    token_needed = [m for m in wanted if METRICS[m].source == "tokens"]
    if tokens is not None:
        acc = _accumulate(tokens, alpha)
        token_values = acc.compute()
        for name in token_needed:
            values[name] = token_values[name]
        if embeddings is None and acc.keep_pooled:
            embeddings = acc.pooled()

    layers = check_embeddings(embeddings) if embeddings is not None else None
    n_layers = len(layers) if layers is not None else None
    pooled_fns: dict[str, Callable[[torch.Tensor], float]] = {
        "dataset_entropy": lambda x: dataset_entropy(x, alpha),
        "effective_rank": lambda x: effective_rank(x, center=True),
        "rankme": rankme,
        "isotropy": isotropy,
        "twonn": twonn_dimension,
    }
    if layers is not None:
        todo = [m for m in wanted if m in pooled_fns]
        for name in progress(todo, show_progress, desc="pooled metrics", unit="metric"):
            values[name] = [pooled_fns[name](layer) for layer in layers]

    if views is not None:
        by_layer = _as_view_layers(views, n_layers)
        view_fns: dict[str, Callable[[list[torch.Tensor]], float]] = {
            "infonce": lambda v: infonce(v[0], v[1], temperature),
            "lidar": lidar,
            "dime": lambda v: dime(
                v[0], v[1], alpha=alpha, n_permutations=n_permutations, random_state=random_state
            ),
        }
        for name in progress(
            [m for m in wanted if m in view_fns], show_progress, desc="view metrics"
        ):
            values[name] = [view_fns[name](v) for v in by_layer]

    if not values:
        raise LOESError(
            f"none of the metrics {wanted} can be computed from what was given "
            "(token metrics need tokens=..., view metrics need views=...)"
        )
    lengths = {len(v) for v in values.values()}
    if len(lengths) != 1:
        raise LOESError(f"inputs disagree on the number of layers: {sorted(lengths)}")
    ordered = {m: values[m] for m in METRICS if m in values}
    names = list(layer_names) if layer_names is not None else None
    if names is not None and len(names) != lengths.pop():
        raise LOESError(
            f"layer_names has {len(names)} names for {len(next(iter(ordered.values())))} layers"
        )
    cka = (
        cka_matrix(layers).cpu() if (with_cka and layers is not None and len(layers) > 1) else None
    )
    return MetricProfile(
        values=ordered,
        directions={m: METRICS[m].direction for m in ordered},
        layer_names=names,
        cka=cka,
        config={
            "alpha": alpha,
            "temperature": temperature,
            "n_permutations": n_permutations,
            "random_state": random_state,
        },
    )


#: Alias: the issue's name for :func:`profile`.
layer_metrics = profile


def _accumulate(tokens: Any, alpha: float) -> TokenMetricAccumulator:
    if isinstance(tokens, TokenMetricAccumulator):
        return tokens
    acc = TokenMetricAccumulator(alpha=alpha)
    if (
        isinstance(tokens, tuple)
        and len(tokens) == 2
        and hasattr(tokens[0], "ndim")
        and tokens[0].ndim == 4
    ):
        acc.update(tokens[0], tokens[1])
        return acc
    if isinstance(tokens, (torch.Tensor,)) and tokens.ndim == 4:
        acc.update(tokens)
        return acc
    if isinstance(tokens, Iterable):
        return acc.consume(tokens)
    raise LOESError(
        "tokens must be a TokenMetricAccumulator, a (states, mask) pair with states of shape "
        "(batch, n_layers, tokens, dim), or an iterable of such batches"
    )
