"""The error categories every named qlora_core error belongs to, and the `qlora` exit code of each.

Each library error class (DataFormatError, LoadError, AdapterFileError, QuantStateError, ...) inherits one
category below *and* the builtin it always was (ValueError, OSError), so `except ValueError` in user code keeps
working while the CLI maps any of them to one `error: <message>` line and a distinct exit code. An exception that
is no QloraError (nor an OSError) is a bug: the CLI lets it print its traceback and exits with 1.
docs/errors.md lists the classes and codes.
"""
from __future__ import annotations


class QloraError(Exception):
    """Base of every error qlora_core raises on purpose; `exit_code` is what the `qlora` command exits with."""
    exit_code = 1


class UsageError(QloraError):
    """A flag, argument or setting out of range, or a combination that cannot work (fix the command line)."""
    exit_code = 2


class DataError(QloraError):
    """Training / eval data that cannot be read as records: encoding, JSON, missing or mistyped fields."""
    exit_code = 3


class FileLoadError(QloraError):
    """A model, adapter, checkpoint or quant-state file that is missing, truncated, corrupt or of another format."""
    exit_code = 4


class NonFiniteError(QloraError):
    """NaN or Inf values: in a weight, adapter or optimizer state file, or in the loss of a training run."""
    exit_code = 5


# category -> exit code; 1 is a bug (any other exception), 2 is also argparse's code for a bad flag
EXIT_CODES = {"bug": 1, UsageError: 2, DataError: 3, FileLoadError: 4, NonFiniteError: 5}
OS_ERROR_EXIT = EXIT_CODES[FileLoadError]  # a plain OSError (permission denied, disk full) counts as a file error


def exit_code(exc: BaseException) -> int:
    """The `qlora` exit code for `exc`: its category's code, 4 for an OSError, else 1 (a bug)."""
    if isinstance(exc, QloraError):
        return exc.exit_code
    if isinstance(exc, OSError):
        return OS_ERROR_EXIT
    return EXIT_CODES["bug"]


def one_line(exc: BaseException) -> str:
    """`exc`'s message on one line (newlines folded), falling back to its class name when it has none."""
    text = " ".join(str(exc).split()) if str(exc).strip() else type(exc).__name__
    return text
