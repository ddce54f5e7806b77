"""Exception classes shared by the Python code and the C++ extension (which raises some too)."""


class ShardFormatError(ValueError):
    """A token shard or shard directory is malformed, truncated, corrupt or inconsistent.

    The message names the file, the byte offset where the problem was found, and what to do.
    """


class ExtensionNotBuiltError(ImportError):
    """The compiled extension ``cptfast._C`` is missing; the message says how to build it."""


class NonFiniteLossError(RuntimeError):
    """Too many non-finite training steps in a row; the last good state was checkpointed."""
