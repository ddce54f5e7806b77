"""Exception classes shared by the Python code and the C++ extension (which raises some too).

Every error that means "the input, the set-up or the machine is wrong" (not a bug in cptfast)
is a `CptfastError`; the `cptfast` command prints those as one line and anything else with its
traceback. Each class also derives from the built-in class callers would expect (ValueError,
OSError...), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import errno


class CptfastError(Exception):
    """Base of the errors that mean the input or the set-up is wrong (not a bug of cptfast):
    the command line prints them as one line, without a traceback."""


class DataError(CptfastError, ValueError):
    """A data source cannot be used as given (named wrongly, mixed tokenizers, ...)."""


class ShardFormatError(CptfastError, ValueError):
    """A token shard or shard directory is malformed, truncated, corrupt or inconsistent.

    The message names the file, the byte offset where the problem was found, and what to do.
    """


class ConfigError(CptfastError, ValueError):
    """A config key or value (of ``cptfast train``'s TOML or an override) is invalid."""


class CheckpointError(CptfastError, ValueError):
    """A checkpoint that this cptfast cannot resume from."""


class ExtensionNotBuiltError(CptfastError, ImportError):
    """The compiled extension ``cptfast._C`` is missing; the message says how to build it."""


class NonFiniteLossError(CptfastError, RuntimeError):
    """Too many non-finite training steps in a row; the last good state was checkpointed (or,
    when the weights themselves became non-finite, nothing was saved)."""


class NonFiniteWeightsError(CptfastError, ValueError):
    """The base model holds NaN or Inf weights."""


class StalledError(CptfastError, RuntimeError):
    """The loss and gradient norm stopped changing (``train.on_stall = "stop"``)."""


class PeerFailedError(CptfastError, RuntimeError):
    """Under torchrun, a collective failed because another rank died, stopped or timed out."""


class RunInUseError(CptfastError, RuntimeError):
    """Another process is training into the same run directory."""


class TrainingStopped(CptfastError, RuntimeError):
    """SIGTERM or SIGINT stopped the run at a step boundary, after a checkpoint.

    ``exit_code`` is the shell's convention for a signal: 128 + the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class DiskFullError(CptfastError, OSError):
    """The disk (or the user's quota) filled up while writing; the message names the path."""

    @classmethod
    def caused(cls, error: BaseException, message: str) -> DiskFullError | None:
        """A DiskFullError saying ``message`` (which names the path and "no space left on
        device") if ``error`` (or an error it wraps) means the disk or the quota is full, else
        None. torch's writers lose the errno: their messages are recognised."""
        if _disk_full(error):
            return cls(f"{message} ({_last_line(error)})")
        return None


_FULL = (errno.ENOSPC, errno.EDQUOT)
# What torch (zip writer) and safetensors (Rust I/O) say when a write came up short.
_FULL_MESSAGES = ("No space left on device", "Disk quota exceeded", "unexpected pos",
                  "os error 28", "os error 122", "StorageFull", "FilesystemQuotaExceeded")


def _disk_full(error: BaseException, depth: int = 0) -> bool:
    if error is None or depth > 8:
        return False
    if isinstance(error, DiskFullError):
        return False  # already translated
    if isinstance(error, OSError) and error.errno in _FULL:
        return True
    if any(text in str(error) for text in _FULL_MESSAGES):  # also each rank's error of dcp
        return True
    return any(_disk_full(e, depth + 1) for e in (error.__cause__, error.__context__))


def _last_line(error: BaseException) -> str:
    """The informative end of a message (torch.distributed.checkpoint's hold tracebacks)."""
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:200]
