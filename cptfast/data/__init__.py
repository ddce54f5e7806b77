"""The data pipeline: `prepare` (text → token shards), shard readers, and (later) the packed loader."""

from cptfast.data.formats import Manifest, ShardFileInfo, TokenizerInfo
from cptfast.data.prep import PrepareSummary, prepare
from cptfast.data.shards import ShardDirectory, open_shard, open_shards, verify
from cptfast.errors import ShardFormatError

__all__ = [
    "Manifest", "PrepareSummary", "ShardDirectory", "ShardFileInfo", "ShardFormatError",
    "TokenizerInfo", "open_shard", "open_shards", "prepare", "verify",
]
