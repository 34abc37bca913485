"""What every command shares: the error policy, argument types and path checks.

The error policy: a user mistake (a :class:`~loes.LOESError`, a bad path, a
missing extra, a malformed file, a bad option) is ONE line on stderr,
``loes <command>: error: <what is wrong>; <how to fix>``, and exit code 2;
Ctrl-C is one line and exit code 130. Output paths are checked before any work
starts. An unexpected exception (a bug) is one line and exit code 1; with
``-v`` its traceback is logged.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from loes._exceptions import LOESError

__all__ = [
    "ArgumentParser",
    "check_device",
    "check_input_path",
    "check_model_folder",
    "check_output_dir",
    "check_output_file",
    "finite_float",
    "nonnegative_int",
    "positive_float",
    "positive_int",
    "k_value",
    "run_command",
    "show_warning",
    "write_or_print",
]

logger = logging.getLogger("loes.cli")

EXIT_USAGE = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130

#: A Hugging Face hub id: ``name`` or ``owner/name``.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is the one-line error of the policy (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}; see '{self.prog} --help'\n")
        raise SystemExit(EXIT_USAGE)


def _int_type(least: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}; got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be {what}; got {value}")
        return value

    parse.__name__ = what
    return parse


#: argparse types: ``positive_int`` (>= 1) and ``nonnegative_int`` (>= 0).
positive_int = _int_type(1, "a positive integer")
nonnegative_int = _int_type(0, "an integer >= 0")


def k_value(text: str):
    """argparse type: a layer budget, a positive integer or ``auto``."""
    return "auto" if text.strip().lower() == "auto" else positive_int(text)


def finite_float(text: str) -> float:
    """argparse type: a finite float (no ``nan``/``inf``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number; got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number; got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0; got {text!r}")
    return value


def check_device(device: str | None) -> None:
    """A usable torch device name (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ``auto``), checked before any load."""
    if device is None or device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise LOESError(
            f"--device {device!r} is not a device name; use cpu, cuda, cuda:N or mps"
        ) from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LOESError(
                f"--device {device}: CUDA is not available on this machine; use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LOESError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                f"use cuda:0 ... cuda:{torch.cuda.device_count() - 1}"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise LOESError(
            f"--device {device}: MPS is not available on this machine; use --device cpu"
        )
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise LOESError(
            f"--device {device}: unsupported device type {dev.type!r}; use cpu, cuda or mps"
        )


def check_input_path(
    value: str, option: str, *, remote: str = "", prefixes: Iterable[str] = ()
) -> None:
    """A local path that does not exist is an error; a string shaped like a hub id is let through.

    ``remote`` names what else the value may be (e.g. ``"a hub id"``) for the message;
    values starting with one of ``prefixes`` (``"loes:"``) are left to the library.
    """
    if any(value.startswith(p) for p in prefixes) or os.path.exists(value):
        return
    looks_local = (
        not remote
        or not _HUB_ID.match(value)
        or value.startswith((".", "~"))
        or Path(value).suffix.lower()
        in (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt", ".gguf")
    )
    if looks_local:
        also = f" (nor {remote})" if remote else ""
        raise LOESError(f"{option} {value}: no such file or folder{also}; check the path")


def check_model_folder(value: str, option: str, *, gguf_file: str | None = None) -> None:
    """A local model folder must hold ``config.json`` (or the ``gguf_file``), checked before any load."""
    if not os.path.isdir(value):
        return
    needed = gguf_file or "config.json"
    if not os.path.exists(os.path.join(value, needed)):
        raise LOESError(
            f"{option} {value}: the folder has no {needed}; give a folder written by save_pretrained "
            "(or a hub id)"
        )


def _first_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _check_creatable(folder: Path, option: str, value: Any) -> None:
    base = _first_existing(folder)
    if not base.is_dir():
        raise LOESError(f"{option} {value}: {base} is a file, not a folder; choose another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise LOESError(
            f"{option} {value}: cannot write in {base} (permission denied); choose another path"
        )


def check_output_file(value: Any, option: str, *, suffixes: Iterable[str] = ()) -> Path:
    """Check, before any work, that a file can be written at ``value``.

    The path must not be a folder, its folder must exist or be creatable and
    writable, and its suffix must be one of ``suffixes`` (when given).
    """
    path = Path(value)
    suffixes = tuple(suffixes)
    if path.is_dir() or str(value).endswith(("/", os.sep)):
        raise LOESError(f"{option} {value} is a folder; give a file name inside it")
    if suffixes and path.suffix.lower() not in suffixes:
        raise LOESError(
            f"{option} {value}: unsupported file type {path.suffix or '(none)'!r}; "
            f"use one of {', '.join(suffixes)}"
        )
    if path.exists() and not os.access(path, os.W_OK):
        raise LOESError(
            f"{option} {value}: the file is not writable (permission denied); choose another path"
        )
    _check_creatable(path.parent, option, value)
    return path


def check_output_dir(value: Any, option: str) -> Path:
    """Check, before any work, that ``value`` is a folder or can be created as one, and is writable."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise LOESError(f"{option} {value} is a file, not a folder; give a folder path")
    _check_creatable(path, option, value)
    return path


def write_or_print(text: str, path: Path, command: str) -> bool:
    """Write ``text`` to ``path``; if that fails, say so in one line and print ``text`` to stdout.

    Returns whether the file was written (nothing computed is lost either way).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")
        return True
    except OSError as e:
        _error_line(
            command, f"could not write {path} ({e.strerror or e}); the result follows on stdout"
        )
        sys.stdout.write(text + "\n")
        return False


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _error_line(command: str, message: str) -> None:
    sys.stderr.write(f"loes {command}: error: {_one_line(message)}\n")


def describe(error: BaseException) -> str:
    """The one-line message of a user-facing error: what is wrong and how to fix it."""
    if isinstance(error, LOESError):
        return str(error)
    if isinstance(error, OSError):
        name = getattr(error, "filename", None)
        if name is None:
            return f"{_one_line(error) or type(error).__name__}; check the path or hub id"
        if isinstance(error, FileNotFoundError):
            return f"no such file or folder: {name}; check the path"
        if isinstance(error, IsADirectoryError):
            return f"{name} is a folder; give a file path"
        if isinstance(error, NotADirectoryError):
            return f"{name}: part of the path is not a folder; check the path"
        if isinstance(error, PermissionError):
            return f"permission denied: {name}; choose a path you may read and write"
        return f"{error.strerror or error}: {name}; check the path and the free disk space"
    if isinstance(error, ImportError):
        text = _one_line(error)
        return (
            text
            if "pip install" in text
            else f"{text}; install the missing package (pip install 'loes[hf]')"
        )
    return f"{type(error).__name__}: {_one_line(error)}"


def run_command(
    command: str, func: Callable[[argparse.Namespace], int], args: argparse.Namespace
) -> int:
    """Run one command under the error policy (see the module docstring); returns the exit code."""
    verbose = bool(getattr(args, "verbose", False))
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        _error_line(command, "interrupted; rerun the command to start again")
        return EXIT_INTERRUPTED
    except (LOESError, OSError, ImportError) as e:
        if verbose:
            logger.info("traceback of the error below", exc_info=e)
        _error_line(command, describe(e))
        return EXIT_USAGE
    except Exception as e:  # a bug in loes or a library: still one line, the traceback with -v
        if verbose:
            logger.error("unexpected error", exc_info=e)
        _error_line(
            command,
            f"unexpected {describe(e)}; this is a bug: rerun with -v for the traceback "
            "and report it",
        )
        return EXIT_BUG


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for the CLI: one plain line, no source excerpt."""
    (file or sys.stderr).write(f"loes: {category.__name__}: {_one_line(message)}\n")
