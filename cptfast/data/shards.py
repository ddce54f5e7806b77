"""Opening token shards: one file in any supported format, a whole cptfast shard directory, or
a data source named any way a user names one (`open_source`).

The readers are the memory-mapped C++ ones from ``cptfast._C``: opening validates the file's
structure (and, given a vocabulary size, every token id), and documents come back as
read-only numpy views, without copies.
"""

from __future__ import annotations

import bisect
import glob
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cptfast._ext import extension
from cptfast.data.formats import Manifest, sha256_file
from cptfast.errors import DataError, ShardFormatError

FORMATS = ("auto", "megatron", "llmc", "headerless", "datatrove")
DELIMITER_ROLES = ("end", "start")
_LLMC_MAGICS = (20240520, 20240801)


def _megatron_prefix(path: Path) -> str | None:
    """The common prefix of a Megatron pair named by its .bin, its .idx or the prefix itself
    (names may hold dots: ``corpus-v1.1_text_document``), if its .idx exists (a missing
    .bin is then reported by the reader)."""
    text = str(path)
    for suffix in (".bin", ".idx"):
        if text.endswith(suffix):
            text = text[: -len(suffix)]
            break
    return text if Path(text + ".idx").is_file() else None


def _guess_format(path: Path) -> str:
    if str(path).endswith(".idx") or _megatron_prefix(path) is not None:
        return "megatron"
    if str(path).endswith((".ds", ".ds.index")):
        return "datatrove"
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
               delimiter: int | None = None, delimiter_role: str | None = None):
    """Open one token file and validate it; returns a ``cptfast._C.TokenShard``.

    - ``megatron``: ``path`` is the ``.bin``, the ``.idx`` or their common prefix (dots in the
      name are fine); the ``.idx`` gives the documents. This is cptfast's own layout.
    - ``llmc``: an llm.c shard. llm.c puts a delimiter before every document and trains on
      the stream as it is. For GPT-2 shards (magic 20240520) the delimiter is end-of-text
      (50256), which the model must learn to predict, so a document is the tokens *after*
      its delimiter up to *and including* the next one (``delimiter_role="end"``); a leading
      end-of-text ends nothing and is dropped. For Llama-3 shards (20240801) it is the BOS
      (128000), which begins its document as the Llama tokenizer does (``"start"``).
      ``delimiter`` and ``delimiter_role`` override what the magic implies. llm.c's writers
      cut documents at shard boundaries: one file's reader keeps the pieces at its edges as
      documents and counts them in ``cut_documents``; a source of several shards
      (:func:`open_source`, :class:`PackedLoader`) joins them, so the document continues
      into the next shard whole.
    - ``headerless``: raw ``dtype`` ("uint16"/"uint32"/"int32") tokens; every ``eos_id`` ends
      a document (nanoGPT's ``train.bin``), or begins one with ``delimiter_role="start"``.
    - ``datatrove``: a ``.ds`` token file with its ``.ds.index`` (uint64 document ends); the
      token size comes from ``dtype``, the ``.ds.metadata`` file, or the sizes of the two.
    - ``auto``: megatron when an ``.idx`` is beside the file, datatrove for ``.ds``, llmc when
      the llm.c magic leads, otherwise headerless (which then needs ``dtype`` and ``eos_id``).

    With ``vocab_size``, every token id is checked to lie in ``[0, vocab_size)``. Any problem
    raises :class:`cptfast.errors.ShardFormatError` naming the file, byte offset and fix.
    """
    if format not in FORMATS:
        raise DataError(f"format must be one of {FORMATS}, got {format!r}")
    if delimiter_role not in (None, "", *DELIMITER_ROLES):
        raise DataError(f"delimiter_role must be one of {DELIMITER_ROLES}, got "
                         f"{delimiter_role!r}")
    path = Path(path)
    if format == "auto":
        format = _guess_format(path)
    C = extension()
    role = delimiter_role or ""
    if format == "megatron":
        prefix = _megatron_prefix(path) or str(path)
        shard = C.open_megatron(f"{prefix}.bin", f"{prefix}.idx")
    elif format == "llmc":
        shard = C.open_llmc(str(path), -1 if delimiter is None else delimiter, role)
    elif format == "datatrove":
        data = Path(str(path)[: -len(".index")]) if str(path).endswith(".index") else path
        index = Path(f"{data}.index")
        shard = C.open_datatrove(str(data), str(index), dtype or _datatrove_dtype(data, index))
    else:
        eos_id = eos_id if eos_id is not None else delimiter
        if dtype is None or eos_id is None:
            raise DataError(
                f"{path}: a headerless token file carries no dtype or document boundaries; "
                "pass dtype='uint16' or 'uint32' and the eos_id that ends each document "
                "(in a source's table: format = \"headerless\", dtype = \"uint16\", eos_id = N)")
        shard = C.open_headerless(str(path), dtype, eos_id, role)
    if vocab_size is not None:
        shard.check_token_range(vocab_size)
    return shard


def _datatrove_dtype(data: Path, index: Path) -> str:
    """The token type of a datatrove file: its .ds.metadata says ("name|token_size"), else the
    ratio of the file size to the last document end."""
    metadata = Path(f"{data}.metadata")
    if metadata.is_file():
        first = metadata.read_text(errors="replace").splitlines()[:1]
        size = first[0].rsplit("|", 1)[-1].strip() if first else ""
        if size in ("2", "4"):
            return "uint16" if size == "2" else "uint32"
    try:
        ends = index.stat().st_size
        with open(index, "rb") as f:
            f.seek(max(ends - 8, 0))
            last = int.from_bytes(f.read(8), "little")
        size = data.stat().st_size
    except OSError as error:
        raise ShardFormatError(f"{error.filename}: cannot open ({error.strerror}); a datatrove "
                               "source needs the .ds file and its .ds.index") from None
    if last and size % last == 0 and size // last in (2, 4):
        return "uint16" if size // last == 2 else "uint32"
    raise ShardFormatError(f"{data}: cannot tell the token size ({size} bytes for {last} "
                           "tokens); pass dtype = \"uint16\" or \"uint32\"")


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


# ---- data sources: every way a user names one -------------------------------------------------

SOURCE_OPTIONS = ("format", "dtype", "eos_id", "delimiter", "delimiter_role")


@dataclass
class OpenedSource:
    """The readers of one data source, in order, with its manifest when it is a cptfast
    directory (foreign shards have none)."""

    name: str
    readers: list
    manifest: object = None  # Manifest | None
    described: str = ""      # how the user named it, for messages
    _documents: object = field(default=None, repr=False)

    def documents(self):
        """The source's documents as the loader sees them (``cptfast._C.Source``): files of
        one delimiter-split stream are joined, so a document cut at a file's end is whole."""
        if self._documents is None:
            try:
                self._documents = extension().Source(self.readers)
            except ValueError as error:
                raise DataError(f"source {self.name!r}: {error}") from None
        return self._documents

    @property
    def num_tokens(self) -> int:
        return int(self.documents().num_tokens)

    @property
    def cut_documents(self) -> int:
        """Documents cut at the source's edges (inside it, files of one stream are joined)."""
        return int(self.documents().cut_documents)

    @property
    def eos_id(self) -> int | None:
        if self.manifest is not None:
            return self.manifest.tokenizer.eos_id
        ends = [r.delimiter for r in self.readers if r.delimiter_role == "end"]
        return ends[0] if ends else None


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _files_of_directory(directory: Path) -> list[str]:
    """The token files of a directory without a manifest: Megatron pairs (by prefix),
    datatrove .ds files, and other .bin files (llm.c or headerless), sorted."""
    names = sorted(p.name for p in directory.iterdir() if p.is_file())
    found = []
    for name in names:
        if name.endswith(".idx") and name[:-4] + ".bin" in names:
            found.append(str(directory / name[:-4]))
        elif name.endswith(".ds") and name + ".index" in names:
            found.append(str(directory / name))
        elif name.endswith(".bin") and name[:-4] + ".idx" not in names:
            found.append(str(directory / name))
    return found


def _expand(spec, name: str) -> list[str]:
    """The token files (or Megatron prefixes) a path, prefix, glob or directory names."""
    text = str(spec)
    if _is_glob(text):
        matches = sorted(glob.glob(text))
        if not matches:
            raise ShardFormatError(f"source {name!r}: the pattern {text!r} matches no file")
        files = []
        for match in matches:
            if Path(match).is_dir():
                files += _expand(match, name)
                continue
            prefix = _megatron_prefix(Path(match))
            key = prefix if prefix is not None else match
            if match.endswith(".ds.index") or match.endswith(".ds.metadata"):
                key = match.rsplit(".", 1)[0]
            if key not in files:
                files.append(key)
        return files
    path = Path(text)
    if path.is_dir():
        files = _files_of_directory(path)
        splits = {split for f in files for split in ("_train_", "_val_") if split in Path(f).name}
        if len(splits) == 2:  # llm.c's naming: {name}_{split}_{k:06d}.bin
            raise DataError(
                f"source {name!r}: {path} holds both training and validation shards "
                "(*_train_*.bin and *_val_*.bin); name one split with a glob, e.g. "
                f"\"{path / '*_train_*.bin'}\"")
        if not files:
            raise ShardFormatError(
                f"source {name!r}: {path} has no manifest.json and no token files (.bin/.idx "
                "Megatron pairs, llm.c or headerless .bin, datatrove .ds + .ds.index). Name a "
                "directory written by `cptfast prepare`, such files, a prefix or a glob")
        return files
    if path.is_file() or _megatron_prefix(path) is not None:
        return [text]
    if Path(text + ".ds").is_file():
        return [text + ".ds"]
    raise ShardFormatError(
        f"source {name!r}: {text} is not a file, a directory, a Megatron prefix (PREFIX.bin + "
        "PREFIX.idx) or a glob that matches files; check the path")


def open_source(spec, *, name: str = "source", vocab_size: int | None = None,
                check_tokens: bool = True, **options) -> OpenedSource:
    """Open a data source named in any of the ways cptfast accepts, validating every file.

    ``spec`` is a cptfast shard directory (with ``manifest.json``), an opened
    :class:`ShardDirectory`, a directory of Megatron ``.bin``/``.idx`` pairs, llm.c or
    datatrove files without a manifest, a Megatron prefix, a ``.bin``/``.idx``/``.ds`` file,
    a glob (``fineweb_train_*.bin``), a list of any of these (or of opened readers), or a
    table ``{"path": ..., "format": ..., "dtype": ..., "eos_id": ..., "delimiter_role":
    ...}`` (the keys of a ``[data.sources.NAME]`` table). ``options`` are those same keys.
    With ``vocab_size`` (the model's embedding rows) every token id is checked, and errors
    name the source, the file, the token id and the embedding size. ``check_tokens=False``
    skips the check of a cptfast directory's ids against its own tokenizer (a full scan).
    """
    if isinstance(spec, Mapping):
        table = dict(spec)
        if "path" not in table:
            raise DataError(f"source {name!r}: a source table needs a path")
        unknown = set(table) - {"path", *SOURCE_OPTIONS}
        if unknown:
            raise DataError(f"source {name!r}: unknown keys {sorted(unknown)}; a source takes "
                             f"path and {', '.join(SOURCE_OPTIONS)}")
        spec = table.pop("path")
        options = {**options, **{k: v for k, v in table.items() if v not in (None, "")}}
    options = {k: v for k, v in options.items() if v not in (None, "")}
    unknown = set(options) - set(SOURCE_OPTIONS)
    if unknown:
        raise DataError(f"source {name!r}: unknown options {sorted(unknown)}")
    if options.get("format", "auto") not in FORMATS:
        raise DataError(f"source {name!r}: format must be one of {', '.join(FORMATS)}, got "
                         f"{options['format']!r}")
    described = str(spec)
    opened = OpenedSource(name=name, readers=[], described=described)
    if isinstance(spec, ShardDirectory) or (isinstance(spec, (str, Path)) and
                                           (Path(spec) / "manifest.json").is_file()):
        directory = spec if isinstance(spec, ShardDirectory) else _named(
            name, open_shards, spec, check_tokens=check_tokens)
        opened.readers, opened.manifest = list(directory.shards), directory.manifest
        largest = max((f.max_token_id for f in directory.manifest.files), default=-1)
        if vocab_size is not None and largest >= vocab_size:
            raise ShardFormatError(
                f"source {name!r} ({directory.path}): holds token id {largest} but the model's "
                f"embedding has {vocab_size} rows; prepare the data with the model's tokenizer "
                "(or resize the embeddings first)")
        return opened
    items = list(spec) if isinstance(spec, Sequence) and not isinstance(spec, str) else [spec]
    if not items:
        raise DataError(f"source {name!r}: an empty list of shard files")
    for item in items:
        if hasattr(item, "document_offsets"):  # an opened reader
            opened.readers.append(item)
            continue
        if isinstance(item, (str, Path)) and (Path(item) / "manifest.json").is_file():
            opened.readers += _named(name, open_shards, item, check_tokens=check_tokens).shards
            continue
        if not isinstance(item, (str, Path)):
            raise DataError(f"source {name!r}: expected a path, prefix, glob, directory or a "
                             f"list of them, got {item!r}")
        for path in _expand(item, name):
            opened.readers.append(_named(name, open_shard, path, **options))
    if vocab_size is not None:
        for reader in opened.readers:
            try:
                reader.check_token_range(vocab_size)
            except ShardFormatError as error:
                raise ShardFormatError(f"source {name!r}: {error} (the model's embedding has "
                                       f"{vocab_size} rows)") from None
    return opened


def _named(name: str, function, *args, **kwargs):
    """Call ``function``, prefixing a data error with the source's name."""
    try:
        return function(*args, **kwargs)
    except ShardFormatError as error:
        if str(error).startswith(f"source {name!r}"):
            raise
        raise ShardFormatError(f"source {name!r}: {error}") from None
    except ValueError as error:  # a bad option (dtype, role) for this reader
        raise DataError(f"source {name!r}: {error}") from None
