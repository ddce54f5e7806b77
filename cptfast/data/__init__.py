"""The data pipeline: `prepare` (text → token shards), shard readers and the packed loader."""

from cptfast.data.formats import Manifest, ShardFileInfo, TokenizerInfo
from cptfast.data.prep import PrepareSummary, prepare
from cptfast.data.shards import (OpenedSource, ShardDirectory, open_shard, open_shards,
                                 open_source, verify)
from cptfast.errors import ShardFormatError

__all__ = [
    "Batch", "Manifest", "OpenedSource", "PackedLoader", "PrepareSummary", "ShardDirectory",
    "ShardFileInfo", "ShardFormatError", "TokenizerInfo", "open_shard", "open_shards",
    "open_source", "prepare", "verify",
]


def __getattr__(name: str):
    # The loader brings torch with it; `cptfast prepare` and its workers do not need it.
    if name in ("Batch", "PackedLoader"):
        from cptfast.data import loader
        return getattr(loader, name)
    raise AttributeError(f"module 'cptfast.data' has no attribute {name!r}")
