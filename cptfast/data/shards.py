"""Opening token shards: one file in any supported format, or a whole cptfast shard directory.

The readers are the memory-mapped C++ ones from ``cptfast._C``: opening validates the file's
structure (and, given a vocabulary size, every token id), and documents come back as
read-only numpy views, without copies.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cptfast._ext import extension
from cptfast.data.formats import Manifest, sha256_file
from cptfast.errors import ShardFormatError

FORMATS = ("auto", "megatron", "llmc", "headerless")
_LLMC_MAGICS = (20240520, 20240801)


def _guess_format(path: Path) -> str:
    if path.suffix == ".idx" or path.with_suffix(".idx").is_file():
        return "megatron"
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as error:
        raise ShardFormatError(f"{path}: cannot open ({error.strerror}); check the path") from None
    if len(head) == 4 and int.from_bytes(head, "little") in _LLMC_MAGICS:
        return "llmc"
    return "headerless"


def open_shard(path: str | Path, *, format: str = "auto", vocab_size: int | None = None,
               dtype: str | None = None, eos_id: int | None = None,
               delimiter: int | None = None):
    """Open one token file and validate it; returns a ``cptfast._C.TokenShard``.

    - ``megatron``: ``path`` is the ``.bin`` (or the ``.idx``, or the common prefix); the
      ``.idx`` beside it gives the documents. This is cptfast's own layout.
    - ``llmc``: an llm.c shard; every ``delimiter`` token (default: the magic's end-of-text /
      begin-of-text id) starts a document.
    - ``headerless``: raw ``dtype`` ("uint16"/"uint32") tokens; every ``eos_id`` ends a document.
    - ``auto``: megatron when an ``.idx`` is beside the file, llmc when the llm.c magic leads,
      otherwise headerless (which then needs ``dtype`` and ``eos_id``).

    With ``vocab_size``, every token id is checked to lie in ``[0, vocab_size)``. Any problem
    raises :class:`cptfast.errors.ShardFormatError` naming the file, byte offset and fix.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    path = Path(path)
    if format == "auto":
        format = _guess_format(path)
    C = extension()
    if format == "megatron":
        prefix = path.with_suffix("") if path.suffix in (".bin", ".idx") else path
        shard = C.open_megatron(f"{prefix}.bin", f"{prefix}.idx")
    elif format == "llmc":
        shard = C.open_llmc(str(path), -1 if delimiter is None else delimiter)
    else:
        if dtype is None or eos_id is None:
            raise ValueError(
                f"{path}: a headerless token file carries no dtype or document boundaries; "
                "pass dtype='uint16' or 'uint32' and the eos_id that ends each document")
        shard = C.open_headerless(str(path), dtype, eos_id)
    if vocab_size is not None:
        shard.check_token_range(vocab_size)
    return shard


@dataclass
class ShardDirectory:
    """A cptfast shard directory opened and cross-checked against its manifest.

    ``shards[k]`` is the reader of ``manifest.files[k]``; documents are numbered globally in
    file order by :meth:`document`.
    """

    path: Path
    manifest: Manifest
    shards: list

    def __post_init__(self):
        # _first_document[k]: global number of shards[k]'s first document.
        self._first_document = [0]
        for shard in self.shards[:-1]:
            self._first_document.append(self._first_document[-1] + len(shard))

    @property
    def num_documents(self) -> int:
        return self.manifest.documents

    @property
    def num_tokens(self) -> int:
        return self.manifest.tokens

    def __len__(self) -> int:
        return self.num_documents

    def document(self, i: int) -> np.ndarray:
        """Global document ``i`` as a read-only numpy view."""
        if not -self.num_documents <= i < self.num_documents:
            raise IndexError(f"document {i} out of range for {self.num_documents} documents")
        i %= self.num_documents
        k = bisect.bisect_right(self._first_document, i) - 1
        return self.shards[k].document(i - self._first_document[k])

    def __iter__(self):
        for shard in self.shards:
            for i in range(len(shard)):
                yield shard.document(i)


def open_shards(directory: str | Path, *, check_tokens: bool = True) -> ShardDirectory:
    """Open a shard directory written by ``cptfast prepare``.

    Checks the manifest, opens every ``.bin``/``.idx`` pair (structure validated by the C++
    reader), and checks each file's dtype and document and token counts against the manifest;
    with ``check_tokens`` every token id is checked against the tokenizer's vocabulary size.
    Checksums are not recomputed here (that reads every byte): see :func:`verify`.
    """
    directory = Path(directory)
    manifest = Manifest.read(directory)
    shards = []
    for info in manifest.files:
        shard = open_shard(directory / f"{info.name}.bin", format="megatron",
                           vocab_size=manifest.tokenizer.vocab_size if check_tokens else None)
        found = (shard.dtype, shard.num_documents, shard.num_tokens)
        expected = (manifest.dtype, info.documents, info.tokens)
        if found != expected:
            raise ShardFormatError(
                f"{shard.path}: holds (dtype, documents, tokens) = {found} but the manifest "
                f"says {expected}; the files do not belong to this manifest, re-run "
                "`cptfast prepare`")
        shards.append(shard)
    return ShardDirectory(path=directory, manifest=manifest, shards=shards)


def verify(directory: str | Path) -> ShardDirectory:
    """Fully check a shard directory: structure, token ids, counts and every file's sha256.

    Returns the opened directory; raises ShardFormatError on the first problem found.
    """
    opened = open_shards(directory, check_tokens=True)
    for info, shard in zip(opened.manifest.files, opened.shards):
        for suffix, expected in ((".bin", info.sha256_bin), (".idx", info.sha256_idx)):
            path = opened.path / f"{info.name}{suffix}"
            actual = sha256_file(path)
            if actual != expected:
                raise ShardFormatError(
                    f"{path}: sha256 {actual} does not match the manifest's {expected}; the file "
                    "changed after `cptfast prepare` wrote it (corruption or an edit); re-run "
                    "prepare or restore the file")
        if shard.max_token_id() != info.max_token_id:
            raise ShardFormatError(
                f"{shard.path}: largest token id is {shard.max_token_id()} but the manifest "
                f"says {info.max_token_id}; re-run `cptfast prepare`")
    return opened
