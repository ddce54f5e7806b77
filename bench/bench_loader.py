"""Packed loader throughput, packing efficiency and memory, against same-run baselines.

- compact batches (rows gathered from the memory maps) vs a plain copy of the same bytes
  (the limit) — goal >= 1,000 M tokens/s on the 2-core development machine;
- expanded batches (input_ids, labels, position_ids int64, cu_seqlens) vs the numpy oracle,
  a nanoGPT-style get_batch (random windows, no document boundaries: less work), and a torch
  DataLoader over an HF `datasets` Dataset with DataCollatorWithFlattening — goal >= 300 M/s;
- non-padding share of bestfit, concat and pad-to-longest on lognormal document lengths —
  goal: bestfit >= 99 %;
- resident memory growth over a full epoch (should be flat);
- the epoch index at 10 M documents: built, and opened from the on-disk cache (read, then
  validated: counts, checksums of the header and the arrays, shape).
"""

import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPEATS, SCALE, record_metric, record_ratio, record_series

from cptfast.data import PackedLoader
from cptfast.data.formats import MegatronShardWriter

SEQ_LEN, BATCH = 2048, 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A uint16 shard of lognormal document lengths (median ~400 tokens), ~50 M tokens."""
    directory = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(0)
    writer = MegatronShardWriter(directory, "corpus", np.uint16)
    lengths_all = []
    while writer.tokens < int(50_000_000 * SCALE):
        lengths = np.clip(rng.lognormal(6.0, 1.0, 20_000).astype(np.int64), 1, 30_000)
        writer.add_documents(rng.integers(0, 50_000, int(lengths.sum()), dtype=np.uint16), lengths)
        lengths_all.append(lengths)
    writer.close()
    return directory / "corpus.bin", np.concatenate(lengths_all)


def rate(fn, seconds=2.0):
    """Tokens per second of fn() (which returns the tokens it produced), over ~seconds."""
    fn()  # warm up
    produced, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        produced += fn()
    return produced / (time.perf_counter() - started)


def test_compact_batches(benchmark, corpus):
    path, _ = corpus
    loader = PackedLoader([[path]], SEQ_LEN, BATCH, num_threads=2, prefetch=8, index_cache=False,
                          host_expand=False)  # what a GPU run moves: 2 bytes per token
    memmap = np.memmap(path, dtype=np.uint16, mode="r")
    target = np.empty(BATCH * (SEQ_LEN + 1), dtype=np.uint16)
    rng = np.random.default_rng(0)

    def plain_copy():  # one contiguous copy of a batch's bytes from a random place in the file
        start = int(rng.integers(0, len(memmap) - len(target)))
        np.copyto(target, memmap[start:start + len(target)])
        return BATCH * SEQ_LEN

    limit = rate(plain_copy)

    def ours():
        return loader.next_compact().rows * SEQ_LEN

    benchmark.pedantic(lambda: [ours() for _ in range(50)], rounds=10, warmup_rounds=1)
    tokens_per_s = 50 * BATCH * SEQ_LEN / benchmark.stats.stats.median
    benchmark.extra_info.update(tokens_per_s=tokens_per_s, memcpy_tokens_per_s=limit)
    record_ratio("compact batches (tokens/s)", "memcpy of the same bytes", tokens_per_s / limit,
                 f"{tokens_per_s / 1e6:,.0f} M/s (goal >= 1,000 M/s); memcpy {limit / 1e6:,.0f} M/s")


def nanogpt_get_batch(memmap, rng):
    """nanoGPT's get_batch: random windows, no document boundaries, no positions."""
    starts = rng.integers(0, len(memmap) - SEQ_LEN - 1, BATCH)
    x = np.stack([memmap[i:i + SEQ_LEN].astype(np.int64) for i in starts])
    y = np.stack([memmap[i + 1:i + 1 + SEQ_LEN].astype(np.int64) for i in starts])
    return x, y


def test_expanded_batches(benchmark, corpus):
    import torch

    path, lengths = corpus
    loader = PackedLoader([[path]], SEQ_LEN, BATCH, num_threads=2, prefetch=8, index_cache=False)
    benchmark.pedantic(lambda: [next(loader) for _ in range(20)], rounds=10, warmup_rounds=1)
    ours = 20 * BATCH * SEQ_LEN / benchmark.stats.stats.median

    memmap = np.memmap(path, dtype=np.uint16, mode="r")
    rng = np.random.default_rng(0)

    def nanogpt():
        x, y = nanogpt_get_batch(memmap, rng)
        torch.from_numpy(x), torch.from_numpy(y)
        return x.size

    nanogpt_rate = rate(nanogpt)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "data"))
    from packing_reference import ReferenceStream  # the tests' oracle, not shipped
    from packing_reference import expand as reference_expand
    offsets = np.concatenate([[0], np.cumsum(lengths[:3000])])
    docs = [np.asarray(memmap[offsets[i]:offsets[i + 1]]) for i in range(3000)]
    reference = ReferenceStream([docs], SEQ_LEN)
    batches = iter(range(10**6))

    def oracle():
        reference_expand(reference.batch_rows(next(batches), BATCH), SEQ_LEN)
        return BATCH * SEQ_LEN

    oracle_rate = rate(oracle, seconds=3.0)
    hf_rate = hf_flattening_rate(memmap, lengths)
    benchmark.extra_info.update(tokens_per_s=ours, nanogpt=nanogpt_rate, oracle=oracle_rate,
                                hf_flattening=hf_rate)
    note = f"{ours / 1e6:,.0f} M/s (goal >= 300 M/s)"
    record_ratio("expanded batches (tokens/s)", "numpy oracle", ours / oracle_rate, note)
    record_ratio("expanded batches (tokens/s)", "nanoGPT get_batch (no boundaries)",
                 ours / nanogpt_rate, f"nanoGPT {nanogpt_rate / 1e6:,.0f} M/s")
    if hf_rate is not None:
        record_ratio("expanded batches (tokens/s)", "HF datasets + FlatteningCollator",
                     ours / hf_rate, f"HF {hf_rate / 1e6:,.1f} M/s")
    # Throughput against the number of gathering threads (0: gathered in __next__).
    by_threads = []
    for threads in (0, 1, 2, 4):
        threaded = PackedLoader([[path]], SEQ_LEN, BATCH, num_threads=threads, prefetch=8,
                                index_cache=False)
        by_threads.append((threads, rate(lambda: next(threaded).num_tokens, 1.0) / 1e6))
    reference_line = [(threads, nanogpt_rate / 1e6) for threads, _ in by_threads]
    record_series("packed loader throughput vs gathering threads", "gathering threads",
                  "expanded tokens/s (millions)", {"cptfast PackedLoader": by_threads,
                                                  "nanoGPT get_batch": reference_line})


def hf_flattening_rate(memmap, lengths):
    """What HF users do: a DataLoader over a tokenized Dataset with DataCollatorWithFlattening."""
    try:
        import datasets
        import torch
        from transformers import DataCollatorWithFlattening
    except ImportError:
        return None  # stated in the summary by its absence; install cptfast[bench]
    offsets = np.concatenate([[0], np.cumsum(lengths[:20_000])])
    lengths_ok = [i for i in range(20_000) if lengths[i] <= SEQ_LEN]
    dataset = datasets.Dataset.from_dict(
        {"input_ids": [memmap[offsets[i]:offsets[i + 1]].tolist() for i in lengths_ok]})
    docs_per_batch = max(1, BATCH * SEQ_LEN // int(np.mean(lengths[lengths <= SEQ_LEN])))
    loader = torch.utils.data.DataLoader(dataset, batch_size=docs_per_batch,
                                         collate_fn=DataCollatorWithFlattening(
                                             return_flash_attn_kwargs=True))
    produced, started = 0, time.perf_counter()
    for batch in loader:
        produced += batch["input_ids"].numel()
        if time.perf_counter() - started > 3:
            break
    return produced / (time.perf_counter() - started)


def test_packing_efficiency(benchmark, corpus):
    path, lengths = corpus
    loader = PackedLoader([[path]], SEQ_LEN, 64, packing="bestfit", num_threads=2,
                          index_cache=False)

    def one_epoch_share():
        real = total = 0
        while loader.report()[0]["epoch"] == 0:
            compact = loader.next_compact()
            real += int(compact.row_used.sum())
            total += compact.rows * SEQ_LEN
        return real / total

    bestfit = benchmark.pedantic(one_epoch_share, rounds=1, iterations=1)
    # Pad-to-longest: batches of 16 documents (truncated to T) padded to the longest.
    rng = np.random.default_rng(0)
    shuffled = np.minimum(rng.permutation(lengths), SEQ_LEN)
    usable = len(shuffled) // 16 * 16
    groups = shuffled[:usable].reshape(-1, 16)
    pad_longest = groups.sum() / (groups.max(axis=1) * 16).sum()
    benchmark.extra_info.update(bestfit=bestfit, concat=1.0, pad_to_longest=pad_longest)
    record_metric("non-padding share, bestfit (one epoch)", f"{bestfit:.2%}", "goal >= 99 %")
    record_metric("non-padding share, concat", "100.00%", "by construction (no padding)")
    record_metric("non-padding share, pad-to-longest (16 docs)", f"{pad_longest:.2%}",
                  "documents truncated to T")


def test_memory_is_flat_over_an_epoch(benchmark, corpus):
    psutil = pytest.importorskip("psutil")
    path, _ = corpus
    loader = PackedLoader([[path]], SEQ_LEN, BATCH, num_threads=2, index_cache=False)
    for _ in range(20):
        next(loader)
    process = psutil.Process()
    before = process.memory_info().rss - process.memory_info().shared
    def rest_of_epoch():
        while loader.report()[0]["epoch"] == 0:
            next(loader)

    benchmark.pedantic(rest_of_epoch, rounds=1, iterations=1)
    after = process.memory_info().rss - process.memory_info().shared
    growth = (after - before) / 2**20
    record_metric("private memory growth over one epoch", f"{growth:+.1f} MiB",
                  "page cache of the memory map excluded")


def first_batch_seconds(readers, packing: str, index_cache) -> float:
    """Seconds to the first batch of a fresh loader: the epoch index built or read back."""
    loader = PackedLoader([readers], 64, 1, packing=packing, num_threads=0,
                          index_cache=index_cache)
    started = time.perf_counter()
    loader.next_compact()
    return time.perf_counter() - started


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
def test_index_cache_validation_cost(benchmark, tmp_path_factory, packing):
    from cptfast.data import open_source

    documents = int(10_000_000 * SCALE)
    directory = tmp_path_factory.mktemp("index")
    rng = np.random.default_rng(0)
    writer = MegatronShardWriter(directory, "many", np.uint16)
    for start in range(0, documents, 1_000_000):
        lengths = rng.integers(1, 9, min(1_000_000, documents - start), np.int64)
        writer.add_documents(rng.integers(0, 50_000, int(lengths.sum()), dtype=np.uint16),
                             lengths)
    writer.close()
    readers = open_source(str(directory / "many")).readers
    cache = directory / "cache"
    build = float(np.median([first_batch_seconds(readers, packing, False)
                             for _ in range(REPEATS)]))
    first_batch_seconds(readers, packing, cache)  # writes the cache
    # Best of repeats for the cached open and for reading the bytes alone (what any cache
    # must read; into a buffer already touched, so the estimate of validation is high).
    cached = min(first_batch_seconds(readers, packing, cache) for _ in range(max(REPEATS, 3)))
    (index_file,) = cache.glob("*.cptidx")
    buffer = bytearray(index_file.stat().st_size)
    reads = []
    for _ in range(max(REPEATS, 3)):
        started = time.perf_counter()
        with open(index_file, "rb", buffering=0) as f:
            f.readinto(buffer)
        reads.append(time.perf_counter() - started)
    read = min(reads)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(build_s=build, cached_s=cached, read_s=read)
    documents_m = len(readers[0]) / 1e6
    record_metric(f"epoch index ({packing}, {documents_m:.0f} M documents): build",
                  f"{build:.3f} s", "no cache")
    record_metric(f"epoch index ({packing}): opened from the cache (read + validated)",
                  f"{cached:.3f} s = {cached / build:.0%} of a build",
                  f"the {index_file.stat().st_size / 2**20:,.0f} MiB alone, into touched "
                  f"memory: {read:.3f} s")
