"""The LOES selection engine. Imports only numpy and torch."""

from loes._linalg import (
    isotropy,
    linear_cka,
    reference_isotropy,
    ridge_gcv_residuals,
    ridge_loo_residuals,
    triangle_geometry,
)
from loes.core.select import DEFAULTS, select_layers_from_custom_embeddings

__all__ = [
    "DEFAULTS",
    "isotropy",
    "linear_cka",
    "reference_isotropy",
    "ridge_gcv_residuals",
    "ridge_loo_residuals",
    "select_layers_from_custom_embeddings",
    "triangle_geometry",
]
