"""What the binaries print: a quiet console, a copy of it in ``WORKDIR/out.log``, one-line errors.

At the default ``--verbosity=0`` the console shows grain_jax's own log lines (progress, the compile and
memory line, evaluation results, where everything is), JAX's warnings and everyone's errors. Library
chatter (orbax's checkpoint internals, clu's parameter table, tfds) appears only with ``--verbosity=1``.
A mistake on the command line or in a config ends in one line naming what to fix (exit 2); any other
failure in one line too (exit 1), with the traceback only at ``--verbosity=1`` (and always in out.log).
The verbosity is the one ``setup`` was last given.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from typing import TextIO

from absl import logging as absl_logging

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACEBACK_HINT = "run with --verbosity=1 for the traceback"


class Failure(Exception):
    """A failure its message fully explains (a missing dependency, an input refused): one line, exit status 1."""
    status = 1


class UsageError(Failure):
    """A mistake in the command line or the config: the message says what to fix (exit status 2)."""
    status = 2


def _ours(record: logging.LogRecord) -> bool:
    return record.name.startswith("grain_jax") or record.pathname.startswith(_PACKAGE_DIR + os.sep)


class _ConsoleFilter(logging.Filter):
    """Default verbosity: grain_jax's lines (process 0 only), JAX's warnings, everyone's errors."""

    def __init__(self, verbosity: int, process_index: int):
        super().__init__()
        self.verbosity, self.process_index = verbosity, process_index

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbosity >= 1:
            return True
        if _ours(record):
            return self.process_index == 0 or record.levelno >= logging.WARNING
        if record.name == "jax" or record.name.startswith("jax."):
            return record.levelno >= logging.WARNING
        return record.levelno >= logging.ERROR


class _ConsoleFormatter(logging.Formatter):
    """Our INFO lines as plain text, our warnings as ``WARNING: ...``, anything else in absl's format."""

    def __init__(self):
        super().__init__()
        self._absl = absl_logging.PythonFormatter()

    def format(self, record: logging.LogRecord) -> str:
        if _ours(record):
            message = record.getMessage()
            return message if record.levelno < logging.WARNING else f"{record.levelname}: {message}"
        return self._absl.format(record)


class _Tee:
    """A text stream that writes to ``stream`` and to ``copy`` (the console and out.log)."""

    def __init__(self, stream: TextIO, copy: TextIO):
        self._stream, self._copy = stream, copy

    def write(self, text: str) -> int:
        self._copy.write(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._copy.flush()
        self._stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the real console's
        return getattr(self._stream, name)


class _StdoutHandler(logging.StreamHandler):
    """A StreamHandler on whatever ``sys.stdout`` is when a record comes: the tee into out.log once there
    is one, a test's capture while one runs."""

    @property
    def stream(self) -> TextIO:
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the property decides
        pass


_log_file: TextIO | None = None
_verbosity = 0


def setup(verbosity: int = 0, workdir: str | None = None, process_index: int = 0) -> str | None:
    """Routes log records to a filtered console (stdout) and, on process 0 with a ``workdir``, copies
    everything the console shows (prints and progress bars too) to ``WORKDIR/out.log`` (appended, so a
    resumed run continues the file). Returns the log file's path, or None."""
    global _log_file, _verbosity
    _verbosity = verbosity
    root = logging.getLogger()
    consoles = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    for handler in list(root.handlers):  # absl's, basicConfig's or ours: each would print every record again
        if (handler is absl_logging.get_absl_handler() or isinstance(handler, _StdoutHandler)
                or type(handler) is logging.StreamHandler and handler.stream in consoles):
            root.removeHandler(handler)
    console = _StdoutHandler()
    console.addFilter(_ConsoleFilter(verbosity, process_index))
    console.setFormatter(_ConsoleFormatter())
    root.addHandler(console)
    root.setLevel(logging.DEBUG if verbosity >= 1 else logging.INFO)
    absl_logging.set_verbosity(absl_logging.DEBUG if verbosity >= 1 else absl_logging.INFO)
    if workdir is None or process_index != 0 or _log_file is not None:
        return None
    from grain_jax import checkpoints  # here: --help and flag errors stay free of orbax's import time
    path = os.path.join(workdir, checkpoints.CONSOLE_LOG)
    _log_file = open(path, "a", buffering=1)
    sys.stdout, sys.stderr = _Tee(sys.stdout, _log_file), _Tee(sys.stderr, _log_file)
    return path


def fail(program: str, error: BaseException) -> int:
    """Prints ``program: error: message`` (one line; the traceback only at verbosity >= 1, and always
    into out.log) and returns the exit status: a Failure's (2 for a UsageError), 1 for anything else."""
    explained = isinstance(error, Failure)
    message = str(error) if explained else f"{type(error).__name__}: {error}".splitlines()[0]
    if _verbosity >= 1:
        traceback.print_exception(error)
    elif _log_file is not None and not isinstance(error, UsageError):
        _log_file.write("".join(traceback.format_exception(error)))
    hint = "" if explained or _verbosity >= 1 else f" ({TRACEBACK_HINT})"
    print(f"{program}: error: {message}{hint}", file=sys.stderr, flush=True)
    return error.status if explained else 1


@contextlib.contextmanager
def one_line_errors(program: str):
    """Turns any exception in the block into ``fail(...)`` and ``sys.exit`` with its status."""
    try:
        yield
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as error:  # noqa: BLE001 -- the binary's last word: one line, never a bare traceback
        sys.exit(fail(program, error))
