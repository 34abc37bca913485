"""Turn a layer selection into a trained predictor.

* :class:`LinearProbe` — closed-form ridge or logistic probe on the
  concatenated selected layers (regularisation chosen on validation data);
* :class:`FusionHead` / :class:`FusionProbe` — the LOES paper's fusion head
  and its AdamW + cosine training loop on cached embeddings;
* :class:`GeoReg` — the geometry regulariser, usable in any training loop;
* :func:`finetune` — a trainable Hugging Face backbone with a fusion head.

Examples
--------
>>> import numpy as np
>>> from loes.transfer import LinearProbe
>>> rng = np.random.default_rng(0)
>>> X = rng.normal(size=(200, 3, 8)); y = (X[:, 1, 0] > 0).astype(int)
>>> LinearProbe(layers=[1]).fit(X[:150], y[:150]).score(X[150:], y[150:]) > 0.9
True
"""

from loes.transfer._finetune import FineTunedModel, finetune
from loes.transfer._fusion import FUSIONS, FusionHead, FusionProbe, cosine_schedule
from loes.transfer._georeg import GeoReg, eigenvalue_variance, triangle_log_area
from loes.transfer._probes import (
    LayerStandardizer,
    LinearProbe,
    encode_labels,
    select_layers,
    split_indices,
    take_layers,
    task_score,
)

__all__ = [
    "FUSIONS",
    "FineTunedModel",
    "FusionHead",
    "FusionProbe",
    "GeoReg",
    "LayerStandardizer",
    "LinearProbe",
    "cosine_schedule",
    "eigenvalue_variance",
    "encode_labels",
    "finetune",
    "select_layers",  # deprecated alias of take_layers
    "split_indices",
    "take_layers",
    "task_score",
    "triangle_log_area",
]
