"""Layer-by-layer representation metrics and label-free layer selectors.

Pure functions on one layer's representations (numpy or torch; computed in
float64):

- information: :func:`prompt_entropy`, :func:`dataset_entropy`,
  :func:`matrix_entropy`, :func:`effective_rank`, :func:`rankme`;
- geometry: :func:`curvature`, :func:`twonn_dimension`, :func:`isotropy`,
  :func:`cka_matrix` (all layers at once);
- augmentation invariance (two or more views): :func:`infonce`,
  :func:`lidar`, :func:`dime`.

:func:`profile` computes every applicable metric for every layer;
:class:`TokenMetricAccumulator` does the token-level ones over a stream of
batches with bounded memory; :func:`select_layers_label_free` turns a metric
(or LOES label-free) into a :class:`~loes.LOESResult`.
"""

from loes._linalg import isotropy
from loes.metrics._entropy import (
    dataset_entropy,
    effective_rank,
    matrix_entropy,
    prompt_entropy,
    rankme,
)
from loes.metrics._geometry import cka_matrix, curvature, twonn_dimension
from loes.metrics._profile import METRICS, MetricProfile, MetricSpec, layer_metrics, profile
from loes.metrics._select import (
    LABEL_FREE_METHODS,
    best_layer_by_metric,
    layer_scores,
    select_layers_label_free,
)
from loes.metrics._streaming import STREAMING_METRICS, covariance_metrics, streaming_profile
from loes.metrics._tokens import TokenMetricAccumulator
from loes.metrics._views import dime, infonce, lidar

__all__ = [
    "LABEL_FREE_METHODS",
    "METRICS",
    "STREAMING_METRICS",
    "MetricProfile",
    "MetricSpec",
    "TokenMetricAccumulator",
    "best_layer_by_metric",
    "layer_metrics",
    "layer_scores",
    "profile",
    "select_layers_label_free",
    "streaming_profile",
    "covariance_metrics",
    "cka_matrix",
    "curvature",
    "dataset_entropy",
    "dime",
    "effective_rank",
    "infonce",
    "isotropy",
    "lidar",
    "matrix_entropy",
    "prompt_entropy",
    "rankme",
    "twonn_dimension",
]
