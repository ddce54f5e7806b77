"""`PackedLoader`: shuffled, packed, mixed, rank-sharded, resumable batches.

The index and the gathering run in C++ (``cptfast._C``): every rank computes the same blend of
sources (seeded, token-weighted), takes every ``world_size``-th global row, and background
threads copy those rows from the memory-mapped shards into compact batches (T+1 token slots per
row plus document boundaries), which are then expanded into ``input_ids``, ``labels``,
``position_ids``, ``cu_seqlens`` and ``max_seqlen``. The exact rules are written out in
``tests/data/packing_reference.py``, the pure-numpy oracle the tests compare against.

The data position is the global row (plus, per source, its row cursor and tokens taken, which
follow from it): ``state_dict()`` after any batch, ``load_state_dict()`` on a loader with any
``world_size``, and the stream continues exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cptfast._ext import extension
from cptfast.data.shards import ShardDirectory, open_source
from cptfast.errors import DataError

PACKINGS = ("concat", "bestfit")
STATE_VERSION = 1


@dataclass
class Batch:
    """One rank's batch of packed rows, ready for a model.

    input_ids, labels, position_ids: int64 [batch_size, seq_len]; labels are the next token,
    or -100 at the last position of every document and at padding; positions restart at 0 in
    every document. cu_seqlens: int32 [sequences + 1], the document (and padding) boundaries
    over the flattened batch; max_seqlen: the longest of those sequences. sources: int32
    [batch_size], the source of each row; global_rows: int64 [batch_size].
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    sources: torch.Tensor
    global_rows: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: str | torch.device, non_blocking: bool = False) -> Batch:
        moved = {name: getattr(self, name).to(device, non_blocking=non_blocking)
                 for name in ("input_ids", "labels", "position_ids", "cu_seqlens", "sources",
                              "global_rows")}
        return Batch(max_seqlen=self.max_seqlen, **moved)


def expand(compact) -> Batch:
    """Expand a ``cptfast._C.CompactBatch`` on the CPU (the rule of csrc/packed_batch.h); a
    batch the gathering thread already expanded is wrapped without copies."""
    extras = dict(sources=torch.from_numpy(np.array(compact.row_source)),
                  global_rows=torch.from_numpy(np.array(compact.global_row)))
    if compact.expanded:
        input_ids, labels, position_ids, cu_seqlens = map(torch.from_numpy,
                                                          compact.expanded_arrays())
        return Batch(input_ids=input_ids, labels=labels, position_ids=position_ids,
                     cu_seqlens=cu_seqlens, max_seqlen=int(compact.max_seqlen), **extras)
    shape = (compact.rows, compact.seq_len)
    input_ids, labels, position_ids = (torch.empty(shape, dtype=torch.int64) for _ in range(3))
    compact.expand_into(input_ids.numpy(), labels.numpy(), position_ids.numpy())
    cu_seqlens, max_seqlen = compact.cu_seqlens()
    return Batch(input_ids=input_ids, labels=labels, position_ids=position_ids,
                 cu_seqlens=torch.from_numpy(cu_seqlens), max_seqlen=int(max_seqlen), **extras)


def default_index_cache() -> Path:
    """``$CPTFAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/cptfast/index``, else ``~/.cache/...``."""
    if os.environ.get("CPTFAST_CACHE_DIR"):
        return Path(os.environ["CPTFAST_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cptfast" / "index"


def expand_on_device(compact, device: torch.device) -> Batch:
    """Copy a compact batch to a CUDA device (2-4 bytes per token) and expand it there with the
    kernel of csrc/expand_batch.cu. Needs the extension built with CUDA."""
    C = extension()
    if not C.has_cuda:
        raise RuntimeError("cptfast._C was built without CUDA; rebuild it with a CUDA torch and "
                           "nvcc (`CPTFAST_CUDA=1 pip install --no-build-isolation -e .`)")

    def staged(array: np.ndarray) -> torch.Tensor:  # via pinned memory: the copy is async
        pinned = torch.empty(array.shape, dtype=_TORCH_DTYPES[array.dtype.name], pin_memory=True)
        pinned.numpy()[...] = array
        return pinned.to(device, non_blocking=True)

    tokens, used = staged(compact.tokens), staged(compact.row_used)
    row_segments, starts = staged(compact.row_segments), staged(compact.segment_starts)
    shape = (compact.rows, compact.seq_len)
    input_ids, labels, position_ids = (torch.empty(shape, dtype=torch.int64, device=device)
                                       for _ in range(3))
    C.expand_on_device(tokens.data_ptr(), compact.tokens.dtype.name, compact.rows,
                       compact.seq_len, used.data_ptr(), row_segments.data_ptr(),
                       starts.data_ptr(), compact.pad_id, input_ids.data_ptr(), labels.data_ptr(),
                       position_ids.data_ptr(), torch.cuda.current_stream(device).cuda_stream)
    cu_seqlens, max_seqlen = compact.cu_seqlens()  # from host metadata: no device sync
    return Batch(input_ids=input_ids, labels=labels, position_ids=position_ids,
                 cu_seqlens=staged(cu_seqlens), max_seqlen=int(max_seqlen),
                 sources=staged(compact.row_source), global_rows=staged(compact.global_row))


_TORCH_DTYPES = {"uint16": torch.uint16, "uint32": torch.uint32, "int32": torch.int32,
                 "int64": torch.int64}


def _loss_mask_files(spec) -> list[str] | None:
    """The loss-mask shard files of a shard directory, if it has them."""
    if isinstance(spec, ShardDirectory):
        spec = spec.path
    if isinstance(spec, Mapping):
        spec = spec.get("path")
    if isinstance(spec, (str, Path)) and (Path(spec) / "loss_mask").is_dir():
        return sorted(str(p) for p in (Path(spec) / "loss_mask").glob("*.bin"))
    return None


class PackedLoader:
    """Endless iterator of :class:`Batch` for one rank.

    Args:
        sources: data sources, as a list or as a ``{name: source}`` mapping. A source is
            anything :func:`cptfast.data.open_source` takes: a cptfast shard directory, a
            directory of Megatron / llm.c / datatrove files, a Megatron prefix, a file, a
            glob, a list of these, or a table ``{"path": ..., "format": "headerless",
            "dtype": "uint16", "eos_id": 50256, "delimiter_role": "end"}``. Sources of
            different token dtypes mix (tokens are widened to a common type).
        seq_len: T, tokens per row (>= 2).
        batch_size: rows per batch on this rank (the global batch is ``batch_size *
            world_size`` rows).
        weights: mixture weights per source, counted in tokens (default: equal); a list in
            source order or a ``{name: weight}`` mapping.
        packing: ``"concat"`` (documents end to end, cut into rows; no padding; every token
            but a document's first is a label exactly once per epoch) or ``"bestfit"``
            (best-fit-decreasing within ``window`` documents; no truncation but pieces of
            documents longer than T; padding counted).
        seed: one seed for all ranks; each source's epoch e is shuffled by (seed, source, e).
        rank, world_size: this rank takes global rows g with g % world_size == rank.
        num_threads: background gathering threads (0: gather in ``__next__``).
        device: where batches go (default CPU). On CUDA, with the extension built with CUDA,
            the compact batch is copied (2-4 bytes per token) and expanded on the device.
        pad_id: token at padding positions (default: the tokenizer's EOS, else 0).
        vocab_size: the model's embedding rows: every token id of every source is checked
            against it (errors name the source, file and token id).
        index_cache: directory where built epoch indices are cached, keyed by everything they
            depend on (each file's identity, size and mtime, its reader's format, dtype,
            delimiter and role; packing, seq_len, window, seed); a cached index is checked on
            load (document and token counts, checksums) and rebuilt when stale; default
            ``$CPTFAST_CACHE_DIR`` or ``~/.cache/cptfast/index``; ``False`` disables it.
        host_expand: expand batches on the gathering threads (default: unless they go to a
            CUDA device, where the compact batch is expanded by a kernel); ``False`` suits
            callers of :meth:`next_compact`.
        loss_masks: apply the loss masks of sources that have them (a ``loss_mask/`` shard
            written by ``prepare(prefix_field=...)``): labels of masked tokens become -100.
            A twin loader over the mask shards yields the very same rows (same documents,
            same index), so the masks line up token for token. Not applied by
            :meth:`next_compact`.
    """

    def __init__(self, sources, seq_len: int, batch_size: int, *, weights=None,
                 packing: str = "concat", seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_threads: int = 2, device: str | torch.device | None = None,
                 window: int = 1024, prefetch: int = 4, pad_id: int | None = None,
                 index_cache: str | Path | bool | None = None, host_expand: bool | None = None,
                 loss_masks: bool = True, vocab_size: int | None = None):
        if packing not in PACKINGS:
            raise DataError(f"packing must be one of {PACKINGS}, got {packing!r}")
        if seq_len < 2:
            raise DataError(f"seq_len must be at least 2 (one input and its label), got {seq_len}")
        if batch_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"need batch_size >= 1 and 0 <= rank < world_size, got "
                             f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if isinstance(sources, Mapping):
            self.source_names = [str(name) for name in sources]
            specs = list(sources.values())
        else:
            specs = list(sources)
            self.source_names = [Path(s).name if isinstance(s, (str, Path)) else f"source{i}"
                                 for i, s in enumerate(specs)]
        if not specs:
            raise DataError("PackedLoader needs at least one source")
        if len(set(self.source_names)) != len(self.source_names):
            raise DataError(f"source names must be unique, got {self.source_names}; pass a "
                             "{name: directory} mapping")
        self.weights = self._weights(weights)

        self._sources, self._readers, self.opened = [], [], []
        for name, spec in zip(self.source_names, specs):
            opened = open_source(spec, name=name, vocab_size=vocab_size)
            self.opened.append(opened)
            self._readers.append(opened.readers)
            self._sources.append(opened.documents())
        known = [o for o in self.opened if o.manifest is not None]
        for other in known[1:]:
            first, fact, facts = known[0], other.manifest.tokenizer, known[0].manifest.tokenizer
            if (fact.vocab_size, fact.sha256) != (facts.vocab_size, facts.sha256):
                raise DataError(
                    f"source {other.name!r} ({other.described}) was tokenized with a different "
                    f"tokenizer (vocab {fact.vocab_size}) than {first.name!r} "
                    f"({first.described}, vocab {facts.vocab_size}); prepare every source with "
                    "the model's tokenizer")
        if pad_id is None:
            pad_id = next((o.eos_id for o in self.opened if o.eos_id is not None), 0)

        self.seq_len, self.batch_size, self.packing, self.seed = seq_len, batch_size, packing, seed
        self.rank, self.world_size, self.window, self.pad_id = rank, world_size, window, pad_id
        self.num_threads, self.prefetch = num_threads, prefetch
        self.host_expand = host_expand
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._cache_prefixes = self._index_cache_prefixes(index_cache)
        self._state = (0, [0] * len(specs), [0] * len(specs))
        self._loader = self._start(self._state)
        self._masks = None
        mask_files = [_loss_mask_files(spec) for spec in specs]
        if loss_masks and any(mask_files):
            # Unmasked sources pass their own tokens through the twin (ignored below).
            twin_sources = {name: files or readers for name, files, readers
                            in zip(self.source_names, mask_files, self._readers)}
            self._masks = PackedLoader(
                twin_sources, seq_len, batch_size, weights=self.weights, packing=packing,
                seed=seed, rank=rank, world_size=world_size, num_threads=num_threads,
                device=device, window=window, prefetch=prefetch, pad_id=0,
                index_cache=index_cache, host_expand=host_expand, loss_masks=False)
            self._masked_sources = torch.tensor([bool(f) for f in mask_files],
                                                device=self.device)

    def _weights(self, weights) -> list[float]:
        if weights is None:
            return [1.0] * len(self.source_names)
        if isinstance(weights, Mapping):
            unknown = set(weights) - set(self.source_names)
            if unknown:
                raise DataError(f"weights name unknown sources {sorted(unknown)}; sources are "
                                 f"{self.source_names}")
            weights = [weights.get(name, 0.0) for name in self.source_names]
        weights = [float(w) for w in weights]
        if len(weights) != len(self.source_names):
            raise DataError(f"got {len(weights)} weights for {len(self.source_names)} sources")
        if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise DataError(f"weights must be finite, non-negative and sum to a positive "
                             f"number, got {weights}")
        return weights

    def _index_cache_prefixes(self, index_cache) -> list[str]:
        if index_cache is False:
            return []
        if index_cache is None or index_cache is True:
            index_cache = default_index_cache()
        directory = Path(index_cache)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DataError(f"index cache directory {directory}: {error.strerror}; pass "
                             "index_cache=<a writable directory> or index_cache=False") from None
        if not os.access(directory, os.W_OK):
            raise DataError(f"index cache directory {directory} is not writable; pass "
                             "index_cache=<a writable directory> or index_cache=False")
        prefixes = []
        for source_id, (source, readers) in enumerate(zip(self._sources, self._readers)):
            # Everything the documents' boundaries depend on: which bytes (file identity, size,
            # mtime) and how they were split (reader format, dtype, delimiter and its role).
            files = []
            for reader in readers:
                files.append([reader.format, reader.dtype, reader.delimiter,
                              reader.delimiter_role, reader.num_documents])
                for path in (reader.path, reader.index_path):
                    if path is not None:
                        stat = os.stat(path)
                        files.append([os.path.realpath(path), stat.st_dev, stat.st_ino,
                                      stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns])
            key = {"version": 2, "packing": self.packing, "seq_len": self.seq_len,
                   "window": self.window, "seed": self.seed, "source": source_id,
                   "documents": source.num_documents, "tokens": source.num_tokens,
                   "files": files}
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
            prefixes.append(str(directory / f"{self.packing}-{digest}"))
        return prefixes

    def _start(self, state):
        global_row, rows, tokens = state
        return extension().PackedLoader(
            self._sources, self.weights, self.packing, self.seq_len, self.batch_size, self.window,
            self.seed, self.rank, self.world_size, self.num_threads, self.prefetch, self.pad_id,
            global_row, list(rows), list(tokens), self._cache_prefixes,
            expand=not self._expands_on_device() if self.host_expand is None else self.host_expand)

    def _expands_on_device(self) -> bool:
        return self.device.type == "cuda" and extension().has_cuda

    def __iter__(self):
        return self

    def next_compact(self):
        """The next compact batch (``cptfast._C.CompactBatch``), without expanding it."""
        compact = self._loader.next()
        self._state = compact.state_after
        return compact

    def __next__(self) -> Batch:
        compact = self.next_compact()
        if self._expands_on_device():
            batch = expand_on_device(compact, self.device)
        else:
            batch = expand(compact)
            batch = batch if self.device.type == "cpu" else batch.to(self.device)
        if self._masks is not None:
            # The twin's labels are the masks of the label tokens (-100 at document ends).
            mask = next(self._masks).labels
            drop = (mask == 0) & self._masked_sources[batch.sources.long()][:, None]
            batch.labels = batch.labels.masked_fill(drop, -100)
        return batch

    # ---- resumption and reporting ------------------------------------------------------------

    def state_dict(self) -> dict:
        """The data position after the last batch returned (valid on any world size)."""
        global_row, rows, tokens = self._state
        return {"version": STATE_VERSION, "global_row": int(global_row), "rows": list(rows),
                "tokens": list(tokens), "seed": self.seed, "packing": self.packing,
                "seq_len": self.seq_len, "window": self.window, "sources": self.source_names,
                "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; the sources, seed, packing and seq_len must match."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')!r} is not "
                             f"{STATE_VERSION}")
        for key in ("seed", "packing", "seq_len", "window", "sources"):
            if state[key] != getattr(self, "source_names" if key == "sources" else key):
                raise DataError(
                    f"loader state has {key}={state[key]!r} but this loader has "
                    f"{getattr(self, 'source_names' if key == 'sources' else key)!r}; resuming "
                    "would read a different stream")
        self._loader = None  # stop the old threads before starting new ones
        self._state = (state["global_row"], list(state["rows"]), list(state["tokens"]))
        self._loader = self._start(self._state)
        if self._masks is not None:
            self._masks.load_state_dict(state)

    def set_weights(self, weights) -> None:
        """Change the mixture from the next batch on (a new phase of the run, e.g. domain
        upsampling at the end): each source continues from its current row, and the blend
        counts tokens afresh, so the new weights hold from this row on. Deterministic: every
        rank switching after the same batch switches at the same global row."""
        self.weights = self._weights(weights)
        global_row, rows, _ = self._state
        self._loader = None  # stop the old threads before starting new ones
        self._state = (global_row, list(rows), [0] * len(rows))
        self._loader = self._start(self._state)
        if self._masks is not None:
            self._masks.set_weights(weights)

    def source_tokens(self) -> dict[str, int]:
        """Tokens in each source (one epoch)."""
        return {name: int(source.num_tokens)
                for name, source in zip(self.source_names, self._sources)}

    def max_token_ids(self) -> dict[str, int]:
        """The largest token id in each source (a scan of the memory maps)."""
        return {name: max(int(reader.max_token_id()) for reader in readers)
                for name, readers in zip(self.source_names, self._readers)}

    def report(self) -> list[dict]:
        """Per source: rows and tokens taken so far, their share, the current epoch, and the
        documents cut at the source's edges (a document llm.c's writer cut at a shard boundary
        continues in the next shard of the source and counts once, whole)."""
        global_row, rows, tokens = self._state
        total = sum(tokens) or 1
        return [{"source": name, "rows": r, "tokens": t, "share": t / total,
                 "target_share": w / sum(self.weights),
                 "epoch": self._loader.row_epoch(s, r),
                 "cut_documents": int(source.cut_documents)}
                for s, (name, r, t, w, source) in enumerate(zip(
                    self.source_names, rows, tokens, self.weights, self._sources))]
