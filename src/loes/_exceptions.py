"""The library's own error and warning types."""

from __future__ import annotations

__all__ = ["LOESError", "LOESWarning"]


class LOESError(ValueError):
    """Raised for invalid input or settings given to a loes function.

    Subclasses :class:`ValueError`, so ``except ValueError`` still catches it.
    """


class LOESWarning(UserWarning):
    """Warns about degenerate but usable data.

    Examples: fewer samples than features (N <= D), a constant layer that can
    never be selected, a class with a single sample, dropped ignore-index labels.
    """
