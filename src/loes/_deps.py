"""Optional dependencies: one helper that imports them with a useful error."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str, package: str | None = None) -> ModuleType:
    """Import ``module`` or raise an ImportError that names the extra to install.

    >>> require("math", extra="core").sqrt(4.0)
    2.0
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        name = package or module.split(".")[0]
        raise ImportError(f"this feature requires {name}: pip install 'loes[{extra}]'") from e
