"""Progress, log and warning output: where loes tells the user what it is doing.

* :func:`progress` wraps a loop: a tqdm bar on a terminal, a log line every
  few seconds elsewhere (logs, CI, captured notebooks).
* :func:`quiet_third_party` silences transformers' / huggingface_hub's
  logging, progress bars and warnings around model loading and extraction.
* :func:`find_stacklevel` and :func:`warnings_at_caller` make a
  :class:`~loes.LOESWarning` point at the caller's line, not at loes's files.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from typing import Any, TypeVar

from loes._exceptions import LOESError, LOESWarning

__all__ = [
    "LOG_EVERY",
    "LOG_INTERVAL_S",
    "find_stacklevel",
    "progress",
    "progress_enabled",
    "quiet_third_party",
    "verbose_logger",
    "warnings_at_caller",
]

ProgressSetting = bool | str | None
F = TypeVar("F", bound=Callable[..., Any])

#: Seconds between two progress lines when stderr is not a terminal.
LOG_INTERVAL_S = 5.0
#: Also write a line every this many items (0: by time only).
LOG_EVERY = 0

#: Where progress lines go when stderr is not a terminal (see :func:`progress`).
PROGRESS_LOGGER = logging.getLogger("loes.progress")

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def progress_enabled(show_progress: ProgressSetting) -> bool:
    """Whether progress is shown at all: ``True``/``"on"``/``"auto"`` yes,
    ``False``/``"off"``/``None`` no (a bar or log lines: see :func:`progress`)."""
    if show_progress is None:
        return False
    if isinstance(show_progress, str):
        value = show_progress.lower()
        if value not in {"auto", "on", "off"}:
            raise LOESError(
                f"show_progress must be a bool or one of 'auto', 'on', 'off'; got {show_progress!r}"
            )
        return value != "off"
    return bool(show_progress)


def progress(
    iterable: Iterable[Any],
    show_progress: ProgressSetting = "auto",
    *,
    desc: str = "",
    total: int | None = None,
    unit: str = "it",
    interval: float | None = None,
    every: int | None = None,
) -> Iterable[Any]:
    """Wrap ``iterable`` to report progress; items are yielded unchanged.

    With progress on (``"auto"``, ``"on"``, ``True``):

    * stderr is a terminal: a tqdm bar (removed when done);
    * otherwise (a log file, CI, a captured notebook): a line such as
      ``loes: extract: 12/40 batch (30%), 2.41 batch/s, ETA 0:12, elapsed 0:05``
      every ``interval`` seconds (default :data:`LOG_INTERVAL_S`, 5 s) and every
      ``every`` items (default :data:`LOG_EVERY`: by time only), plus a final
      ``done`` line when any was written. Loops shorter than the interval stay
      silent. The lines go to the ``"loes.progress"`` logger at INFO when the
      application configured logging (a handler on it or an ancestor: it then
      decides what is shown), else straight to ``sys.stderr`` (prefixed
      ``[loes]`` unless ``desc`` names loes), so a default run in a log or CI shows them.

    Parameters
    ----------
    iterable : iterable
    show_progress : bool or {"auto", "on", "off"} or None
    desc, unit : str
        Label of the loop and of one item.
    total : int, optional
        Number of items (default ``len(iterable)`` when it has one).
    interval : float, optional
        Seconds between log lines.
    every : int, optional
        Items between log lines (0: by time only).
    """
    if not progress_enabled(show_progress):
        return iterable
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if getattr(sys.stderr, "isatty", lambda: False)():
        from tqdm import tqdm

        return tqdm(
            iterable,
            desc=desc,
            total=total,
            unit=unit,
            leave=False,
            dynamic_ncols=True,
            file=sys.stderr,
        )
    return _log_lines(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        interval=LOG_INTERVAL_S if interval is None else float(interval),
        every=LOG_EVERY if every is None else int(every),
    )


def _clock(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def _rate(n: int, elapsed: float, unit: str) -> str:
    if n == 0 or elapsed <= 0:
        return f"? {unit}/s"
    per_s = n / elapsed
    return f"{per_s:.2f} {unit}/s" if per_s >= 1 else f"{elapsed / n:.2f} s/{unit}"


def _logging_configured(logger: logging.Logger) -> bool:
    """Whether ``logger`` or an ancestor it propagates to has a handler other than a NullHandler."""
    node: logging.Logger | None = logger
    while node is not None:
        if any(not isinstance(h, logging.NullHandler) for h in node.handlers):
            return True
        node = node.parent if node.propagate else None
    return False


def _write_line(line: str) -> None:
    if _logging_configured(PROGRESS_LOGGER):
        PROGRESS_LOGGER.info(line)
    else:
        print(
            line if line.lower().startswith("loes") else f"[loes] {line}",
            file=sys.stderr,
            flush=True,
        )


def _log_lines(
    iterable: Iterable[Any], *, desc: str, total: int | None, unit: str, interval: float, every: int
) -> Iterator[Any]:
    """Yield from ``iterable``, writing a progress line by time and by count."""
    label = f"{desc}: " if desc else ""
    start = last = time.perf_counter()
    n = 0
    wrote = False
    for item in iterable:
        yield item
        n += 1
        now = time.perf_counter()
        if now - last >= interval or (every > 0 and n % every == 0):
            last = now
            wrote = True
            elapsed = now - start
            if total:
                eta = _clock((total - n) * elapsed / n) if n < total else "0:00"
                _write_line(
                    f"{label}{n}/{total} {unit} ({100 * n / total:.0f}%), "
                    f"{_rate(n, elapsed, unit)}, ETA {eta}, elapsed {_clock(elapsed)}"
                )
            else:
                _write_line(
                    f"{label}{n} {unit}, {_rate(n, elapsed, unit)}, ETA ?, "
                    f"elapsed {_clock(elapsed)}"
                )
    if wrote:
        elapsed = time.perf_counter() - start
        _write_line(f"{label}done {n} {unit} in {_clock(elapsed)} ({_rate(n, elapsed, unit)})")


#: Modules whose Python warnings :func:`quiet_third_party` hides.
_THIRD_PARTY = r"(transformers|huggingface_hub|accelerate|gguf|tokenizers)(\.|$)"


@contextlib.contextmanager
def quiet_third_party(verbose: bool = False, *, gguf: bool = False) -> Iterator[None]:
    """Silence third-party chatter for the block unless ``verbose``; restore it after.

    Inside the block: transformers' logging is set to ERROR and its progress bars
    ("Loading weights", ...) are off; huggingface_hub's download bars are off;
    Python warnings raised from transformers, huggingface_hub, accelerate, gguf
    and tokenizers are ignored; with ``gguf=True`` transformers' GGUF
    de-quantisation bar is off too. loes's own warnings and errors are untouched.
    """
    if verbose:
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", module=_THIRD_PARTY)
        try:
            import huggingface_hub.utils as hub
        except ImportError:
            hub = None
        if hub is not None and not hub.are_progress_bars_disabled():
            hub.disable_progress_bars()
            stack.callback(hub.enable_progress_bars)
        try:
            import transformers.utils.logging as tlog
        except ImportError:
            tlog = None
        if tlog is not None:
            level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
            tlog.set_verbosity_error()
            tlog.disable_progress_bar()
            if bars:
                stack.callback(tlog.enable_progress_bar)
            stack.callback(tlog.set_verbosity, level)
        if gguf and tlog is not None:
            with contextlib.suppress(ImportError):
                module = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
                stack.callback(setattr, module, "tqdm", module.tqdm)
                module.tqdm = functools.partial(module.tqdm, disable=True)
        yield


def _in_package(frame: FrameType) -> bool:
    return frame.f_code.co_filename.startswith(_PACKAGE_DIR)


def find_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised at the calling line point at the
    first frame outside the loes package (the user's line)::

        warnings.warn(msg, LOESWarning, stacklevel=find_stacklevel())
    """
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and _in_package(frame):
        frame = frame.f_back
        level += 1
    return level if frame is not None else max(level - 1, 1)


def warnings_at_caller(fn: F) -> F:
    """Decorate a public entry point: every :class:`~loes.LOESWarning` raised while it
    runs (however deep, whatever its ``stacklevel``) is reported at the line that
    called it from outside loes, after the call (also when it raises). The
    caller's warning filters then apply as usual (``"default"``: once per calling
    line; ``"error"``: raised there). Other warnings pass through unchanged.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        caller: FrameType | None = sys._getframe(1)
        while caller is not None and _in_package(caller):
            caller = caller.f_back
        caught: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as caught:  # type: ignore[assignment]
                warnings.simplefilter("always", LOESWarning)
                return fn(*args, **kwargs)
        finally:
            for w in caught:
                if issubclass(w.category, LOESWarning) and caller is not None:
                    g = caller.f_globals
                    warnings.warn_explicit(
                        w.message,
                        w.category,
                        caller.f_code.co_filename,
                        caller.f_lineno,
                        module=g.get("__name__"),
                        registry=g.setdefault("__warningregistry__", {}),
                        module_globals=g,
                    )
                else:
                    warnings.showwarning(
                        w.message, w.category, w.filename, w.lineno, w.file, w.line
                    )

    return wrapper  # type: ignore[return-value]


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
    node: logging.Logger | None = logger
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
