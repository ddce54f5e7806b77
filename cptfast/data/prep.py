"""`cptfast prepare`: text corpora → a cptfast shard directory.

Documents are read in input order, tokenized in worker processes (each document gets the
tokenizer's own special tokens, e.g. a Llama BOS, then EOS appended unless already last),
and written in input order into ``.bin``/``.idx`` shards of about ``shard_tokens`` tokens.
The output appears atomically: everything is written to a hidden sibling directory, fsynced,
the manifest written last, and only then renamed into place, so a killed run leaves nothing
that looks like a shard directory. The same inputs give the same bytes whatever the number
of workers.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import itertools
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cptfast.data.formats import (Manifest, MegatronShardWriter, ShardFileInfo, TokenizerInfo,
                                  fsync_path, token_dtype_for_vocab)
from cptfast.errors import DataError

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
DEFAULT_SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 tokens per .bin
BATCH_DOCUMENTS = 256           # documents per worker task
BATCH_CHARACTERS = 1 << 20      # ... or fewer, once a batch holds this much text


# ---- reading documents ----------------------------------------------------------------------

def _suffix_kind(path: Path) -> str | None:
    name = path.name.lower()
    for kind, suffixes in (("txt", TEXT_SUFFIXES), ("jsonl", JSONL_SUFFIXES),
                           ("parquet", PARQUET_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Input files in the given order; a directory contributes its supported files, sorted."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _suffix_kind(p))
            if not found:
                raise DataError(f"{path}: directory holds no .txt, .jsonl[.gz] or .parquet files")
            files.extend(found)
        elif not path.is_file():
            raise FileNotFoundError(f"{path}: input file not found")
        elif _suffix_kind(path) is None:
            raise DataError(f"{path}: unsupported input type; use .txt, .jsonl, .jsonl.gz "
                             "or .parquet")
        else:
            files.append(path)
    if not files:
        raise DataError("no input files given")
    return files


def _decode_error(path: Path, error: UnicodeDecodeError, where: str = "") -> ValueError:
    return ValueError(f"{path}{where}: not valid UTF-8 at byte {error.start} ({error.reason}); "
                      "convert the file to UTF-8")


def iter_documents(path: Path, *, text_field: str = "text", split_lines: bool = False,
                   prefix_field: str | None = None) -> Iterator:
    """The documents of one input file as strings (None for a missing/null parquet value), or
    (prefix, text) pairs with ``prefix_field`` (a missing or null prefix is "")."""
    kind = _suffix_kind(path)
    if prefix_field is not None and kind == "txt":
        raise DataError(f"{path}: --prefix-field needs .jsonl or .parquet input (a field "
                         "beside the text)")
    if kind == "txt":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise _decode_error(path, error) from None
        if split_lines:
            yield from text.splitlines()
        else:
            yield text
    elif kind == "jsonl":
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f":{line_number}"
                try:
                    record = json.loads(line)
                except UnicodeDecodeError as error:
                    raise _decode_error(path, error, where) from None
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}{where}: invalid JSON ({error.msg}); each line must "
                                     "be one JSON object") from None
                if not isinstance(record, dict) or text_field not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise DataError(f"{path}{where}: no field {text_field!r} (found {keys}); "
                                     "pass --text-field with the field that holds the text")
                text = record[text_field]
                if text is not None and not isinstance(text, str):
                    raise DataError(f"{path}{where}: field {text_field!r} holds a "
                                     f"{type(text).__name__}, not a string")
                if prefix_field is not None:
                    yield (str(record.get(prefix_field) or ""), text)
                else:
                    yield text
    elif kind == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow; "
                              "`pip install 'cptfast[parquet]'`") from None
        table = pq.ParquetFile(path)
        if text_field not in table.schema_arrow.names:
            raise DataError(f"{path}: no column {text_field!r} (found "
                             f"{table.schema_arrow.names}); pass --text-field")
        columns = [text_field] + ([prefix_field] if prefix_field is not None else [])
        missing = [c for c in columns if c not in table.schema_arrow.names]
        if missing:
            raise DataError(f"{path}: no column {missing[0]!r} (found "
                             f"{table.schema_arrow.names})")
        for batch in table.iter_batches(columns=columns, batch_size=4096):
            texts = batch.column(0).to_pylist()
            if prefix_field is None:
                yield from texts
            else:
                yield from zip((str(p or "") for p in batch.column(1).to_pylist()), texts)
    else:
        raise DataError(f"{path}: unsupported input type")


# ---- tokenizing (runs in worker processes) ----------------------------------------------------

_tokenizer = None
_eos_id: int | None = None
_prefix_template = "{}\n\n"


def load_tokenizer(path: str | Path):
    """Load a tokenizer from a local directory with transformers.AutoTokenizer (never online)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: tokenizer directory not found")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _set_tokenizer(tokenizer, eos_id: int, prefix_template: str = "{}\n\n") -> None:
    global _tokenizer, _eos_id, _prefix_template
    _tokenizer, _eos_id, _prefix_template = tokenizer, eos_id, prefix_template


def _init_worker(tokenizer_path: str, eos_id: int, prefix_template: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _set_tokenizer(load_tokenizer(tokenizer_path), eos_id, prefix_template)


def _encode_batch(items: list) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Tokenize documents; return (all tokens as one uint32 array, per-document lengths, and
    for (prefix, text) pairs the loss mask: 0 on the prefix's tokens, 1 on the rest)."""
    if items and isinstance(items[0], tuple):  # prefix (e.g. metadata) then text
        prefixes = [_prefix_template.format(p) if p else "" for p, _ in items]
        heads = _tokenizer(prefixes, add_special_tokens=True, verbose=False)["input_ids"]
        bodies = _tokenizer([t for _, t in items], add_special_tokens=False,
                            verbose=False)["input_ids"]
        encoded, masks = [], []
        for head, body in zip(heads, bodies):  # an empty prefix: just the BOS, if any
            if head and head[-1] == _eos_id:  # tokenizers that append EOS: only at the end
                head = head[:-1]
            encoded.append(head + body)
            masks.append([0] * len(head) + [1] * len(body))
    else:
        encoded = _tokenizer(items, add_special_tokens=True, verbose=False)["input_ids"]
        masks = None
    for k, ids in enumerate(encoded):
        if not ids or ids[-1] != _eos_id:
            ids.append(_eos_id)
            if masks is not None:
                masks[k].append(1)
    lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
    flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.uint32,
                       count=int(lengths.sum()))
    mask = None if masks is None else np.fromiter(itertools.chain.from_iterable(masks),
                                                  dtype=np.uint16, count=int(lengths.sum()))
    return flat, lengths, mask


# ---- the pipeline ---------------------------------------------------------------------------

@dataclass
class PrepareSummary:
    """What `prepare` wrote: counts, the tokens-per-document histogram and throughput."""

    output: Path
    documents: int
    tokens: int
    empty_documents_skipped: int
    files: int
    seconds: float
    # histogram[k] = number of documents with 2**k <= tokens < 2**(k+1)
    length_histogram: list[int] = field(default_factory=list)

    def format(self) -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else float("inf")
        lines = [
            f"wrote {self.output}: {self.documents:,} documents, {self.tokens:,} tokens in "
            f"{self.files} shard file(s) ({self.seconds:.1f} s, {rate:,.0f} tokens/s)",
            f"empty documents skipped: {self.empty_documents_skipped:,}",
            "tokens per document:",
        ]
        peak = max(self.length_histogram, default=0)
        for k, count in enumerate(self.length_histogram):
            if count:
                bar = "#" * max(1, round(40 * count / peak))
                lines.append(f"  {2**k:>9,} - {2**(k + 1) - 1:>9,}  {count:>10,}  {bar}")
        return "\n".join(lines)


def _batches(documents: Iterable[str | None], skipped: list[int]) -> Iterator[list[str]]:
    batch: list[str] = []
    characters = 0
    for item in documents:
        text = item[1] if isinstance(item, tuple) else item
        if text is None or not text.strip():
            skipped[0] += 1
            continue
        batch.append(item)
        characters += len(text)
        if len(batch) >= BATCH_DOCUMENTS or characters >= BATCH_CHARACTERS:
            yield batch
            batch, characters = [], 0
    if batch:
        yield batch


def _tokenizer_fingerprint(directory: Path) -> str:
    """sha256 over the names and bytes of the files the tokenizer saved."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


class _ShardSink:
    """Appends documents to shard files, starting a new file once one reaches shard_tokens."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int):
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        self.files: list[ShardFileInfo] = []
        self.writer: MegatronShardWriter | None = None
        self.histogram = np.zeros(64, dtype=np.int64)

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self.histogram += np.bincount(np.log2(lengths).astype(np.int64), minlength=64)[:64]
        start_doc, start_tok = 0, 0
        ends = np.cumsum(lengths)
        while start_doc < len(lengths):
            if self.writer is None:
                self.writer = MegatronShardWriter(self.directory, f"part-{len(self.files):05d}",
                                                  self.dtype)
            # Take documents until this file reaches shard_tokens (documents never split).
            room = self.shard_tokens - self.writer.tokens
            stop_doc = int(np.searchsorted(ends, start_tok + room, side="left")) + 1
            stop_doc = min(stop_doc, len(lengths))
            stop_tok = int(ends[stop_doc - 1])
            self.writer.add_documents(tokens[start_tok:stop_tok], lengths[start_doc:stop_doc])
            if self.writer.tokens >= self.shard_tokens:
                self.files.append(self.writer.close())
                self.writer = None
            start_doc, start_tok = stop_doc, stop_tok

    def close(self) -> list[ShardFileInfo]:
        if self.writer is not None:
            self.files.append(self.writer.close())
            self.writer = None
        return self.files

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare(inputs: Iterable[str | Path], output: str | Path, tokenizer: str | Path, *,
            text_field: str = "text", split_lines: bool = False,
            prefix_field: str | None = None, prefix_template: str = "{}\n\n",
            shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int | None = None,
            overwrite: bool = False, progress: bool | None = None) -> PrepareSummary:
    """Tokenize text files into a cptfast shard directory at ``output``.

    Args:
        inputs: ``.txt`` (whole file = one document, or one per line with ``split_lines``),
            ``.jsonl``/``.jsonl.gz`` (``text_field`` of each line) and ``.parquet`` (column
            ``text_field``; needs pyarrow) files, or directories of them.
        output: directory to create; it must not exist (or be empty) unless ``overwrite``.
        tokenizer: a local directory ``transformers.AutoTokenizer`` loads; it is copied into
            ``output/tokenizer`` and fingerprinted in the manifest.
        shard_tokens: a shard file is closed once it holds at least this many tokens.
        workers: tokenizer processes (default: one per available core; 1 = in-process).
        progress: show a progress bar (default: when stderr is a terminal).
        prefix_field: a field of each record (.jsonl/.parquet) put before the text as
            ``prefix_template.format(value)`` and kept out of the loss: ``output/loss_mask``
            gets a shard of 0/1 per token (0 on the prefix) with the same documents. With a
            metadata field (e.g. ``url``) and a cooldown without it, this is MeCo.

    Empty (all-whitespace) documents are skipped and counted. Returns a summary.
    """
    started = time.perf_counter()
    output = Path(output).absolute()
    files = expand_inputs(inputs)
    if shard_tokens <= 0:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")
    if output.exists() and not overwrite and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"{output}: already exists and is not empty; choose another "
                              "--output or pass --overwrite")

    tok = load_tokenizer(tokenizer)
    eos_id = tok.eos_token_id
    if eos_id is None:
        raise DataError(f"{tokenizer}: the tokenizer defines no eos_token, so documents could "
                         "not be told apart in packed rows; set eos_token in its "
                         "tokenizer_config.json")
    vocab_size = len(tok)
    dtype = token_dtype_for_vocab(vocab_size)

    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(output)
    staging = output.parent / f".{output.name}.partial-{_staging_owner()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    sink = _ShardSink(staging, dtype, shard_tokens)
    mask_sink = None
    if prefix_field is not None:  # same documents, same file splits: aligned shard by shard
        (staging / "loss_mask").mkdir()
        mask_sink = _ShardSink(staging / "loss_mask", np.dtype(np.uint16), shard_tokens)
    pool = None
    try:
        tok.save_pretrained(str(staging / "tokenizer"))
        skipped = [0]
        documents = (doc for path in files
                     for doc in iter_documents(path, text_field=text_field,
                                               split_lines=split_lines,
                                               prefix_field=prefix_field))
        batches = _batches(documents, skipped)

        from tqdm.auto import tqdm
        bar = tqdm(unit=" docs", desc="prepare", dynamic_ncols=True,
                   disable=(not sys.stderr.isatty()) if progress is None else not progress)

        def consume(result: tuple[np.ndarray, np.ndarray, np.ndarray | None]) -> None:
            tokens, lengths, mask = result
            sink.add(tokens, lengths)
            if mask_sink is not None:
                mask_sink.add(mask, lengths)
            bar.update(len(lengths))
            total = sum(f.tokens for f in sink.files) + (sink.writer.tokens if sink.writer else 0)
            elapsed = time.perf_counter() - started
            bar.set_postfix(tokens=f"{total:,}", tokens_per_s=f"{total / elapsed:,.0f}",
                            refresh=False)

        if workers == 1:
            _set_tokenizer(tok, eos_id, prefix_template)
            for batch in batches:
                consume(_encode_batch(batch))
        else:
            import multiprocessing
            # fork: workers start in milliseconds (spawn would re-import transformers in each).
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = multiprocessing.get_context(method).Pool(
                workers, initializer=_init_worker,
                initargs=(str(tokenizer), eos_id, prefix_template))
            pending: deque = deque()
            for batch in batches:  # bounded in flight: memory stays flat on any corpus size
                pending.append(pool.apply_async(_encode_batch, (batch,)))
                if len(pending) >= 2 * workers:
                    consume(pending.popleft().get())
            while pending:
                consume(pending.popleft().get())
            pool.close()
            pool.join()
            pool = None
        bar.close()
        shard_files = sink.close()
        if mask_sink is not None:
            mask_sink.close()

        manifest = Manifest(
            tokenizer=TokenizerInfo(path=str(Path(tokenizer).absolute()),
                                    sha256=_tokenizer_fingerprint(staging / "tokenizer"),
                                    vocab_size=vocab_size, bos_id=tok.bos_token_id, eos_id=eos_id),
            dtype=dtype.name, files=shard_files,
            documents=sum(f.documents for f in shard_files),
            tokens=sum(f.tokens for f in shard_files),
            max_token_id=max((f.max_token_id for f in shard_files), default=-1),
            empty_documents_skipped=skipped[0], inputs=[str(p.absolute()) for p in files])
        if manifest.documents == 0:
            raise DataError(f"no non-empty documents in {[str(p) for p in files]}; nothing "
                             f"written ({skipped[0]} empty documents skipped)")
        manifest.write(staging)
        fsync_path(staging)
        _publish(staging, output)
    except BaseException:
        if pool is not None:
            pool.terminate()
        sink.abort()
        if mask_sink is not None:
            mask_sink.abort()
        shutil.rmtree(staging, ignore_errors=True)
        raise

    histogram = [int(c) for c in sink.histogram]
    while histogram and histogram[-1] == 0:
        histogram.pop()
    return PrepareSummary(output=output, documents=manifest.documents, tokens=manifest.tokens,
                          empty_documents_skipped=manifest.empty_documents_skipped,
                          files=len(shard_files), seconds=time.perf_counter() - started,
                          length_histogram=histogram)


def _staging_owner(pid: int | None = None) -> str:
    return f"{socket.gethostname()}-{os.getpid() if pid is None else pid}"


def _remove_abandoned_staging(output: Path) -> None:
    """Delete staging directories that killed runs for this output left on this host."""
    prefix = f".{output.name}.partial-{socket.gethostname()}-"
    for path in output.parent.glob(f"{glob.escape(prefix)}*"):
        pid = path.name[len(prefix):].split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # that run is still going
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            continue  # alive, owned by another user


def _publish(staging: Path, output: Path) -> None:
    """Move the finished staging directory to ``output``, replacing what was there."""
    previous = None
    if output.exists():
        previous = output.parent / f".{output.name}.replaced-{uuid.uuid4().hex[:12]}"
        os.rename(output, previous)
    os.rename(staging, output)
    fsync_path(output.parent)
    if previous is not None:
        shutil.rmtree(previous) if previous.is_dir() else previous.unlink()
