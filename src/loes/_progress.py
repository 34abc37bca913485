"""Progress bars and log output with the reference's show_progress/verbose semantics."""

from __future__ import annotations

import logging
import sys
from typing import Any, Iterable, Optional, Union

from loes._exceptions import LOESError

__all__ = ["progress", "progress_enabled", "verbose_logger"]

ProgressSetting = Union[bool, str, None]


def progress_enabled(show_progress: ProgressSetting) -> bool:
    """``"auto"`` shows bars only on an interactive terminal; ``True``/``"on"``
    always, ``False``/``"off"``/``None`` never."""
    if show_progress is None:
        return False
    if isinstance(show_progress, str):
        value = show_progress.lower()
        if value not in {"auto", "on", "off"}:

            raise LOESError(
                f"show_progress must be a bool or one of 'auto', 'on', 'off'; got {show_progress!r}"
            )
        if value == "auto":
            return bool(getattr(sys.stderr, "isatty", lambda: False)())
        return value == "on"
    return bool(show_progress)


def progress(
    iterable: Iterable[Any],
    show_progress: ProgressSetting = "auto",
    *,
    desc: str = "",
    total: Optional[int] = None,
    unit: str = "it",
) -> Iterable[Any]:
    """Wrap ``iterable`` in a tqdm bar when progress is enabled."""
    if not progress_enabled(show_progress):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)


class _TqdmHandler(logging.StreamHandler):
    """Writes log lines through tqdm so they do not break progress bars."""

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - trivial
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


#: Where ``verbose=False`` runs send their progress logs: nowhere (as in the
#: published code, progress is logged only when asked for).
_QUIET = logging.getLogger("loes._quiet")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False
_QUIET.setLevel(logging.CRITICAL)


def verbose_logger(logger: logging.Logger, verbose: bool) -> logging.Logger:
    """The logger a run with this ``verbose`` setting logs progress to.

    ``verbose=False``: a silent logger. ``verbose=True``: ``logger``, made visible
    even when the application configured no logging: if neither ``logger`` nor any ancestor has a real handler (only the library's
    NullHandler), attach one stderr handler once, at INFO level. An application
    that configured logging keeps full control.
    """
    if not verbose:
        return _QUIET
    configured = False
    node: Optional[logging.Logger] = logger
    while node is not None:
        if any(not isinstance(h, logging.NullHandler) for h in node.handlers):
            configured = True
            break
        node = node.parent if node.propagate else None
    if not configured and not getattr(logger, "_loes_handler", False):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("[loes] %(message)s"))
        logger.addHandler(handler)
        logger._loes_handler = True  # type: ignore[attr-defined]
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    return logger
