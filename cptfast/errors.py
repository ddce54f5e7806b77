"""Exception classes shared by the Python code and the C++ extension (which raises some too)."""


class CptfastError(Exception):
    """Base of the errors that mean the input or the set-up is wrong (not a bug of cptfast):
    the command line prints them as one line, without a traceback."""


class DataError(CptfastError, ValueError):
    """A data source cannot be used as given (named wrongly, mixed tokenizers, ...)."""


class ShardFormatError(CptfastError, ValueError):
    """A token shard or shard directory is malformed, truncated, corrupt or inconsistent.

    The message names the file, the byte offset where the problem was found, and what to do.
    """


class ExtensionNotBuiltError(CptfastError, ImportError):
    """The compiled extension ``cptfast._C`` is missing; the message says how to build it."""


class NonFiniteLossError(CptfastError, RuntimeError):
    """Too many non-finite training steps in a row; the last good state was checkpointed."""
