"""loes: Layerwise Optimal Embedding Selection.

Find the layers of a pretrained model that serve a downstream task best.

The core (this package's top level and :mod:`loes.core`) needs only numpy and
torch. The Hugging Face front end (:mod:`loes.hf`), metrics, transfer heads and
reports sit on top of it and are imported lazily, so ``import loes`` stays
light.
"""

from __future__ import annotations

import logging as _logging

from loes._exceptions import LOESError, LOESWarning
from loes.core import select_layers_from_custom_embeddings
from loes.estimator import LOESSelector
from loes.result import LOESResult, StepTable

__version__ = "0.1.0"

_logging.getLogger(__name__).addHandler(_logging.NullHandler())

_LAZY = {
    "select_layers_from_hf": "loes.hf",
    "select_layers_from_hf_id": "loes.hf",
    "extract_embeddings": "loes.hf",
    "export_features": "loes.hf",
    "ExtractionConfig": "loes.hf",
    "load_features": "loes.store",
}

__all__ = [
    "ExtractionConfig",
    "LOESError",
    "LOESResult",
    "LOESSelector",
    "LOESWarning",
    "StepTable",
    "export_features",
    "extract_embeddings",
    "load_features",
    "select_layers_from_custom_embeddings",
    "select_layers_from_hf",
    "select_layers_from_hf_id",
]


def __getattr__(name: str):
    # Hugging Face entry points live in loes.hf, which imports transformers;
    # load it only when one of them is asked for.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'loes' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
