"""The native shard directory: ``manifest.json`` plus ``<name>.bin``/``<name>.idx`` pairs in
Megatron's MMIDIDX layout (so Megatron and NeMo read our shards and we read theirs).

This module writes them (the readers are in the C++ extension) and reads and checks manifests.
Byte layout of ``.idx`` (little-endian): 9-byte magic ``MMIDIDX\\0\\0``, uint64 version 1,
uint8 dtype code, uint64 sequence count n, uint64 document-entry count n+1, int32[n] lengths,
int64[n] byte offsets into ``.bin``, int64[n+1] document indices (0..n; one document = one
sequence).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cptfast.errors import ShardFormatError

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "cptfast-shards"
FORMAT_VERSION = 1
MMIDIDX_MAGIC = b"MMIDIDX\x00\x00"
MMIDIDX_DTYPE_CODES = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "uint16": 8}


def token_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab ≤ 65,536), else int32 (what Megatron's tools read)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def fsync_path(path: Path) -> None:
    """fsync a file or directory, so a rename after it publishes complete data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class ShardFileInfo:
    """Counts and checksums of one ``<name>.bin``/``<name>.idx`` pair, as the manifest lists it."""

    name: str
    documents: int
    tokens: int
    max_token_id: int
    sha256_bin: str
    sha256_idx: str


class MegatronShardWriter:
    """Writes one ``.bin``/``.idx`` pair, one document per sequence, hashing as it goes."""

    def __init__(self, directory: Path, name: str, dtype: np.dtype):
        self.name = name
        self.dtype = np.dtype(dtype)
        if self.dtype.name not in MMIDIDX_DTYPE_CODES:
            raise ValueError(f"dtype {self.dtype} has no MMIDIDX code")
        self.bin_path = Path(directory) / f"{name}.bin"
        self.idx_path = Path(directory) / f"{name}.idx"
        self._bin = open(self.bin_path, "wb")
        self._bin_hash = hashlib.sha256()
        self._lengths: list[np.ndarray] = []
        self.tokens = 0
        self.max_token_id = -1

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one flat token array and the length of each document."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.sum() != len(tokens):
            raise ValueError(f"lengths sum to {lengths.sum()} but {len(tokens)} tokens were given")
        if len(lengths) and (lengths.min() <= 0 or lengths.max() >= 2**31):
            raise ValueError("every document needs between 1 and 2**31 - 1 tokens")
        if len(tokens):
            top = int(tokens.max())
            if top > np.iinfo(self.dtype).max or int(tokens.min()) < 0:
                raise ValueError(f"token id {top} does not fit the shard dtype {self.dtype}")
            self.max_token_id = max(self.max_token_id, top)
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self._bin.write(data)
        self._bin_hash.update(data)
        self._lengths.append(lengths)
        self.tokens += len(tokens)

    def close(self) -> ShardFileInfo:
        """Flush and fsync both files; return what the manifest records of them."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        n = len(lengths)
        pointers = np.zeros(n, dtype=np.int64)
        np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        index = b"".join([
            MMIDIDX_MAGIC,
            np.uint64(1).tobytes(),
            np.uint8(MMIDIDX_DTYPE_CODES[self.dtype.name]).tobytes(),
            np.uint64(n).tobytes(),
            np.uint64(n + 1).tobytes(),
            lengths.astype("<i4").tobytes(),
            pointers.astype("<i8").tobytes(),
            np.arange(n + 1, dtype="<i8").tobytes(),
        ])
        with open(self.idx_path, "wb") as f:
            f.write(index)
            f.flush()
            os.fsync(f.fileno())
        return ShardFileInfo(
            name=self.name, documents=n, tokens=self.tokens, max_token_id=self.max_token_id,
            sha256_bin=self._bin_hash.hexdigest(), sha256_idx=hashlib.sha256(index).hexdigest())

    def abort(self) -> None:
        self._bin.close()


@dataclass
class TokenizerInfo:
    path: str
    sha256: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None


@dataclass
class Manifest:
    """Everything needed to trust and use a shard directory without re-reading the corpus."""

    tokenizer: TokenizerInfo
    dtype: str
    files: list[ShardFileInfo]
    documents: int
    tokens: int
    max_token_id: int
    empty_documents_skipped: int = 0
    inputs: list[str] = field(default_factory=list)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def write(self, directory: Path) -> None:
        """Write ``manifest.json`` atomically (temporary name, fsync, rename)."""
        final = Path(directory) / MANIFEST_NAME
        partial = final.with_name(final.name + ".partial")
        with open(partial, "w") as f:
            f.write(self.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, final)

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        """Read and check ``directory/manifest.json``; raise ShardFormatError naming the problem."""
        path = Path(directory) / MANIFEST_NAME
        if not Path(directory).is_dir():
            raise ShardFormatError(f"{directory}: not a directory. Pass the directory that "
                                   "`cptfast prepare --output` wrote.")
        if not path.is_file():
            raise ShardFormatError(
                f"{path}: missing, so {directory} is not a directory `cptfast prepare` wrote "
                "(it publishes one only when complete). Foreign shards (Megatron, llm.c, "
                "headerless, datatrove) need no manifest: pass the directory, a prefix, a "
                "glob or a source table to cptfast.data.open_source / PackedLoader or name "
                "it in [data.sources.NAME].")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT_NAME:
                raise ShardFormatError(f"{path}: 'format' is {raw.get('format')!r}, expected "
                                       f"{FORMAT_NAME!r}; this is not a cptfast manifest")
            if raw.get("format_version") != FORMAT_VERSION:
                raise ShardFormatError(
                    f"{path}: format_version {raw.get('format_version')!r} is not supported "
                    f"(this cptfast reads version {FORMAT_VERSION}); upgrade cptfast or re-run "
                    "`cptfast prepare`")
            raw["tokenizer"] = TokenizerInfo(**raw["tokenizer"])
            raw["files"] = [ShardFileInfo(**entry) for entry in raw["files"]]
            manifest = cls(**raw)
        except ShardFormatError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise ShardFormatError(f"{path}: malformed manifest ({type(error).__name__}: "
                                   f"{error}); re-run `cptfast prepare`") from None
        if sum(f.tokens for f in manifest.files) != manifest.tokens or \
                sum(f.documents for f in manifest.files) != manifest.documents:
            raise ShardFormatError(f"{path}: per-file counts do not add up to the totals; the "
                                   "manifest was edited or corrupted, re-run `cptfast prepare`")
        return manifest


def sha256_file(path: Path, chunk_bytes: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
