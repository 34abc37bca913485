"""A scikit-learn style estimator over the selection engine."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from loes._deps import require
from loes._exceptions import LOESError
from loes._rng import RandomState
from loes._validation import as_layer_list
from loes.core.select import select_layers_from_custom_embeddings

__all__ = ["LOESSelector"]


class LOESSelector:
    """Select layers with ``fit`` and keep only them with ``transform``.

    Follows scikit-learn's conventions: ``__init__`` stores its arguments,
    ``fit`` returns ``self`` and learned state ends in ``_``, so the selector
    drops into a ``Pipeline`` (as its first step, before a classifier).

    Parameters
    ----------
    k : int, "auto" or None
        Number of layers to keep; ``"auto"`` (default; None means the same) lets
        the cross-validated probe choose it (see
        :func:`loes.select_layers_from_custom_embeddings`). On the quality
        benchmark (7 real cases × 5 re-splits, docs/evaluation.md) ``"auto"``
        has the best mean of every non-oracle choice (68.0 points; k=3 67.9,
        k=4 67.8, the last layer 64.7) and is never below the last layer on a
        case; a fixed k is cheaper (no cross-validation of layer sets).
    task, preset, reg, alpha, gamma, eta, random_state
        As in :func:`loes.select_layers_from_custom_embeddings`.
    show_progress : bool or str
        Progress bars during ``fit`` (default off).
    options : dict, optional
        Further keyword options for the engine.

    Attributes
    ----------
    selected_layers_ : list of int
        Selected layers in pick order.
    scores_ : list of float
        The pick-time score of each selected layer.
    result_ : LOESResult
        The full result of the last ``fit``.
    n_layers_in_ : int
    layer_dims_ : list of int
        Width of each layer seen in ``fit``; ``transform`` requires the same.

    Examples
    --------
    >>> import numpy as np
    >>> from loes import LOESSelector
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 3, 150)
    >>> X = rng.normal(size=(150, 5, 16))
    >>> X[:, 2, :3] += 4 * np.eye(3)[y]
    >>> sel = LOESSelector(k=1).fit(X, y)
    >>> sel.selected_layers_, sel.transform(X).shape
    ([2], (150, 16))
    """

    def __init__(
        self,
        k: int | str | None = "auto",
        *,
        task: str = "classification",
        preset: str = "robust",
        reg: float | None = None,
        alpha: float | None = None,
        gamma: float | None = None,
        eta: float | None = None,
        random_state: RandomState = 0,
        show_progress: Any = False,
        options: dict[str, Any] | None = None,
    ):
        self.k = k
        self.task = task
        self.preset = preset
        self.reg = reg
        self.alpha = alpha
        self.gamma = gamma
        self.eta = eta
        self.random_state = random_state
        self.show_progress = show_progress
        self.options = options

    # scikit-learn's get_params/set_params without depending on scikit-learn
    @classmethod
    def _get_param_names(cls) -> list[str]:
        """The keyword arguments of ``__init__`` (scikit-learn's rule for estimator parameters)."""
        params = inspect.signature(cls.__init__).parameters.values()
        return sorted(p.name for p in params if p.name != "self" and p.kind != p.VAR_KEYWORD)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The estimator's parameters, as given to ``__init__``."""
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params: Any) -> LOESSelector:
        valid = self.get_params()
        for name, value in params.items():
            if name not in valid:
                raise LOESError(
                    f"invalid parameter {name!r} for LOESSelector; valid: {sorted(valid)}"
                )
            setattr(self, name, value)
        return self

    def fit(self, X: Any, y: Any = None) -> LOESSelector:
        """Select layers from X of shape (n_samples, n_layers, dim) (or a list of
        (n_samples, dim_l) layers) and targets y."""
        result = select_layers_from_custom_embeddings(
            X,
            y,
            k="auto" if self.k is None else self.k,
            task=self.task,
            preset=self.preset,
            reg=self.reg,
            alpha=self.alpha,
            gamma=self.gamma,
            eta=self.eta,
            random_state=self.random_state,
            show_progress=self.show_progress,
            **(self.options or {}),
        )
        self.result_ = result
        self.selected_layers_ = list(result.selected_layers)
        self.scores_ = list(result.layer_scores)
        self.n_layers_in_ = result.num_layers_seen
        self.layer_dims_ = [int(layer.shape[1]) for layer in as_layer_list(X)]
        return self

    def transform(self, X: Any):
        """Concatenate the selected layers: (n_samples, Σ dim of selected layers).

        Returns the input's type (numpy in, numpy out; torch in, torch out).
        """
        if not hasattr(self, "selected_layers_"):
            raise LOESError("this LOESSelector is not fitted yet: call fit(X, y) first")
        layers = as_layer_list(X)
        if len(layers) != self.n_layers_in_:
            raise LOESError(
                f"X has {len(layers)} layers but the selector was fitted on {self.n_layers_in_}"
            )
        dims = [int(layer.shape[1]) for layer in layers]
        if dims != self.layer_dims_:
            bad = next(i for i, (a, b) in enumerate(zip(dims, self.layer_dims_)) if a != b)
            raise LOESError(
                f"layer {bad} of X has width {dims[bad]} but had width {self.layer_dims_[bad]} in fit: "
                "transform needs features from the same model and pooling as fit"
            )
        out = torch.cat([layers[i] for i in self.selected_layers_], dim=1)
        is_numpy = not isinstance(X, torch.Tensor) and not (
            isinstance(X, (list, tuple)) and isinstance(X[0], torch.Tensor)
        )
        if getattr(self, "_output", None) == "pandas":
            pd = require("pandas", extra="hf")
            return pd.DataFrame(out.detach().cpu().numpy(), columns=self.get_feature_names_out())
        return out.numpy() if is_numpy else out

    def fit_transform(self, X: Any, y: Any = None):
        return self.fit(X, y).transform(X)

    def get_feature_names_out(self, input_features: Any = None):
        """Names of ``transform``'s columns: ``"layer{i}_{j}"`` for feature j of selected layer i.

        ``input_features`` is accepted for scikit-learn's API and ignored (the
        input is 3-D; its columns have no names).
        """
        if not hasattr(self, "selected_layers_"):
            raise LOESError("this LOESSelector is not fitted yet: call fit(X, y) first")
        names = [f"layer{i}_{j}" for i in self.selected_layers_ for j in range(self.layer_dims_[i])]
        return np.asarray(names, dtype=object)

    def set_output(self, *, transform: str | None = None) -> LOESSelector:
        """scikit-learn's output API: ``transform="pandas"`` returns a DataFrame whose
        columns are :meth:`get_feature_names_out`; ``"default"`` (or None) the input's type."""
        if transform not in (None, "default", "pandas"):
            raise LOESError(
                f"set_output(transform=...) takes 'default' or 'pandas'; got {transform!r}"
            )
        self._output = transform
        return self

    def __repr__(self) -> str:
        """scikit-learn's style: the class and the parameters that differ from their defaults."""
        defaults = {
            name: p.default
            for name, p in inspect.signature(type(self).__init__).parameters.items()
            if name != "self"
        }
        changed = [
            f"{name}={value!r}"
            for name, value in self.get_params().items()
            if not (value is defaults.get(name) or value == defaults.get(name))
        ]
        return f"{type(self).__name__}({', '.join(changed)})"
