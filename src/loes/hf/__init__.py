"""Hugging Face front end: extraction, calibration sampling, caching and the HF entry points.

Importing this package imports ``transformers`` lazily (inside functions);
``loes`` itself never imports it.
"""

from __future__ import annotations

from loes.hf.api import select_layers_from_hf, select_layers_from_hf_id
from loes.hf.config import ExtractionConfig
from loes.hf.export import export_features, load_embeddings
from loes.hf.extract import (
    Embeddings,
    TokenStates,
    extract_embeddings,
    iter_hidden_states,
    pool_batch,
)
from loes.hf.pooling import POOLINGS, choose_pooling, pool, resolve_pooling
from loes.hf.sampling import DEFAULT_MAX_SAMPLES, calibration_indices

__all__ = [
    "DEFAULT_MAX_SAMPLES",
    "Embeddings",
    "ExtractionConfig",
    "POOLINGS",
    "TokenStates",
    "calibration_indices",
    "choose_pooling",
    "export_features",
    "extract_embeddings",
    "iter_hidden_states",
    "load_embeddings",
    "pool",
    "pool_batch",
    "resolve_pooling",
    "select_layers_from_hf",
    "select_layers_from_hf_id",
]
