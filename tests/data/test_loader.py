"""The packed loader against the numpy oracle (tests/data/packing_reference.py), and the
properties users rely on: coverage, no cross-document labels, disjoint ranks, exact resume,
mixture shares.

The tests of expanded batches take the test device: on the CPU a batch is expanded on the host
(csrc/packed_batch.h); with CPTFAST_TEST_DEVICE=cuda the compact batch is copied to the GPU and
expanded there by the kernel of csrc/expand_batch.cu (what PackedLoader(device="cuda") does), and
compared with the same oracles. Expansion outputs start poisoned on every device, so a position
the rule forgets cannot pass. Index, packing, mixture and error tests are host logic and run on
the CPU in both modes."""

from collections import Counter
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from independent_writers import write_megatron

from cptfast._ext import extension
from cptfast.data import PackedLoader, prepare
from cptfast.data import loader as loader_module
from packing_reference import CompactRow, ReferenceStream, expand

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
POISON = np.iinfo(np.int64).min  # what expansion outputs hold before the rule writes them


@pytest.fixture(scope="session")
def batch_device(device):
    """Where PackedLoader puts (and, on CUDA, expands) its batches in this test mode. In the
    CUDA mode the expansion kernel must exist: with a CPU-only extension PackedLoader(device=
    "cuda") would expand on the host and copy, and the kernel would go untested."""
    if device.type == "cuda" and not extension().has_cuda:
        pytest.fail("CUDA test mode: cptfast._C was built without CUDA, so the device expansion "
                    "kernel (csrc/expand_batch.cu) cannot be tested; rebuild it with a CUDA torch "
                    "and nvcc (`CPTFAST_CUDA=1 pip install --no-build-isolation -e .`)")
    return device


def write_sources(directory, corpora, dtype="uint16"):
    """Each corpus (a list of documents) as one or two Megatron files; returns file lists."""
    sources = []
    for s, docs in enumerate(corpora):
        half = len(docs) // 2  # two files when both halves hold tokens (no empty .bin)
        parts = [docs[:half], docs[half:]] if any(docs[:half]) and any(docs[half:]) else [docs]
        files = []
        for k, part in enumerate(parts):
            bin_path, _ = write_megatron(directory / f"src{s}_{k}", part, dtype)
            files.append(bin_path)
        sources.append(files)
    return sources


corpus = st.lists(st.lists(st.integers(0, 999), min_size=0, max_size=45), min_size=1,
                  max_size=25).filter(lambda docs: any(docs))


@SETTINGS
@given(corpora=st.lists(corpus, min_size=1, max_size=3), seq_len=st.integers(2, 17),
       batch_size=st.integers(1, 3), world_size=st.integers(1, 3), data=st.data(),
       packing=st.sampled_from(["concat", "bestfit"]), seed=st.integers(0, 2**64 - 1),
       window=st.integers(1, 9), threads=st.sampled_from([0, 2]), host_expand=st.booleans())
def test_loader_matches_reference(tmp_path_factory, batch_device, corpora, seq_len, batch_size,
                                  world_size, data, packing, seed, window, threads, host_expand):
    rank = data.draw(st.integers(0, world_size - 1))
    weights = data.draw(st.lists(st.floats(0.05, 5), min_size=len(corpora),
                                 max_size=len(corpora)))
    sources = write_sources(tmp_path_factory.mktemp("c"), corpora)
    loader = PackedLoader(sources, seq_len, batch_size, weights=weights, packing=packing,
                          seed=seed, rank=rank, world_size=world_size, num_threads=threads,
                          window=window, pad_id=7, host_expand=host_expand)
    reference = ReferenceStream([[np.array(d, dtype=np.int64) for d in docs] for docs in corpora],
                                seq_len, packing=packing, window=window, weights=weights,
                                seed=seed, pad_id=7)
    for k in range(6):
        compact = loader.next_compact()
        assert compact.expanded == host_expand
        rows = reference.batch_rows(k, batch_size, rank=rank, world_size=world_size)
        np.testing.assert_array_equal(compact.tokens, np.stack([r.tokens for r in rows]))
        assert compact.row_used.tolist() == [r.used for r in rows]
        assert compact.segment_starts.tolist() == [s for r in rows for s in r.segment_starts]
        got = expand_batch(compact, batch_device)
        want = expand(rows, seq_len, pad_id=7)
        for key in ("input_ids", "labels", "position_ids", "cu_seqlens"):
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"batch {k} {key}")
        assert got["max_seqlen"] == want["max_seqlen"]
    assert loader.state_dict()["rows"] == reference.blend_state(6 * batch_size * world_size)[0]


def expand_on(compact, device):
    """Expand a compact batch as PackedLoader does for ``device``: on the host, or copied to a
    CUDA device and expanded there by the kernel. The int64 outputs it allocates start poisoned
    (on the device too, where fresh memory may still hold an earlier batch's right answer)."""
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        tensor = empty(*args, **kwargs)
        if tensor.dtype == torch.int64 and not kwargs.get("pin_memory", False):
            tensor.fill_(POISON)
        return tensor

    with mock.patch.object(loader_module.torch, "empty", poisoned_empty):
        if device.type == "cpu":
            batch = loader_module.expand(compact)
        else:
            batch = loader_module.expand_on_device(compact, device)
    for name in ("input_ids", "labels", "position_ids", "cu_seqlens", "sources", "global_rows"):
        assert getattr(batch, name).device.type == device.type, name
    return batch


def expand_batch(compact, device):
    batch = expand_on(compact, device)
    return {"input_ids": batch.input_ids.cpu().numpy(), "labels": batch.labels.cpu().numpy(),
            "position_ids": batch.position_ids.cpu().numpy(),
            "cu_seqlens": batch.cu_seqlens.cpu().numpy(), "max_seqlen": batch.max_seqlen}


def expand_arrays_on_device(tokens, used, row_segments, starts, pad_id, device):
    """The CUDA kernel of csrc/expand_batch.cu on a compact batch given as arrays (copied to
    the device); returns (input_ids, labels, position_ids) as numpy, from poisoned outputs."""
    C = extension()
    staged = [torch.from_numpy(np.ascontiguousarray(a)).to(device)
              for a in (tokens, used, row_segments, starts)]
    rows, seq_len = tokens.shape[0], tokens.shape[1] - 1
    outputs = [torch.full((rows, seq_len), POISON, dtype=torch.int64, device=device)
               for _ in range(3)]
    C.expand_on_device(staged[0].data_ptr(), tokens.dtype.name, rows, seq_len,
                       staged[1].data_ptr(), staged[2].data_ptr(), staged[3].data_ptr(), pad_id,
                       *(o.data_ptr() for o in outputs),
                       torch.cuda.current_stream(device).cuda_stream)
    return [o.cpu().numpy() for o in outputs]  # .cpu() waits for the kernel


@st.composite
def compact_rows(draw):
    """Arbitrary valid compact rows, including all-padding rows and a segment at slot T."""
    seq_len = draw(st.integers(2, 12))
    rows = []
    for _ in range(draw(st.integers(1, 4))):
        used = draw(st.integers(0, seq_len + 1))
        inner = draw(st.sets(st.integers(1, max(used - 1, 1)), max_size=6)) if used > 1 else set()
        starts = sorted({0} | inner) if used else []
        tokens = draw(st.lists(st.integers(0, 65535), min_size=seq_len + 1, max_size=seq_len + 1))
        rows.append(CompactRow(tokens=np.array(tokens), used=used, segment_starts=starts,
                               token_count=used))
    return seq_len, rows


@settings(max_examples=300, deadline=None)
@given(case=compact_rows(), pad_id=st.integers(0, 65535), by_token=st.booleans(),
       dtype=st.sampled_from(["uint16", "int32", "uint32"]))
def test_expansion_matches_reference(batch_device, case, pad_id, by_token, dtype):
    # by_token=True runs the per-token search of the CUDA kernel, on the CPU; in the CUDA mode
    # the kernel itself also expands the same rows on the GPU.
    seq_len, rows = case
    tokens = np.stack([r.tokens for r in rows]).astype(dtype)
    used = np.array([r.used for r in rows], np.int32)
    row_segments = np.cumsum([0] + [len(r.segment_starts) for r in rows]).astype(np.int32)
    starts = np.array([s for r in rows for s in r.segment_starts], dtype=np.int32)
    got = extension().expand_compact(tokens, used, row_segments, starts, pad_id, by_token)
    want = expand(rows, seq_len, pad_id=pad_id)
    for value, key in zip(got, ("input_ids", "labels", "position_ids", "cu_seqlens")):
        np.testing.assert_array_equal(value, want[key], err_msg=key)  # outputs were poisoned
    assert got[4] == want["max_seqlen"]
    if batch_device.type == "cuda":
        on_device = expand_arrays_on_device(tokens, used, row_segments, starts, pad_id,
                                            batch_device)
        for value, key in zip(on_device, ("input_ids", "labels", "position_ids")):
            np.testing.assert_array_equal(value, want[key], err_msg=f"{key} (CUDA kernel)")


def test_expansion_rejects_inconsistent_rows():
    C = extension()
    tokens = np.zeros((1, 5), np.uint16)
    with pytest.raises(ValueError, match="segment starts must rise from 0"):
        C.expand_compact(tokens, np.array([4], np.int32), np.array([0, 2], np.int32),
                         np.array([0, 4], np.int32))  # a start at used
    with pytest.raises(ValueError, match="row_used must lie in"):
        C.expand_compact(tokens, np.array([6], np.int32), np.array([0, 1], np.int32),
                         np.array([0], np.int32))


def documents(seed, count, longest):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 60000, int(n)).tolist() for n in rng.integers(1, longest, count)]


def test_concat_labels_every_token_but_document_firsts_once_per_epoch(tmp_path, batch_device):
    docs = documents(0, 200, 60) + [[5]] * 10  # includes one-token documents
    (files,) = write_sources(tmp_path, [docs])
    seq_len = 32
    loader = PackedLoader([files], seq_len, 4, num_threads=2, device=batch_device)
    epoch_tokens = sum(map(len, docs))
    inputs, labels = Counter(), Counter()
    position = 0  # stream position of the row's first slot
    while position < epoch_tokens:
        batch = next(loader)
        assert batch.input_ids.device.type == batch.labels.device.type == batch_device.type
        for ids, labs in zip(batch.input_ids.tolist(), batch.labels.tolist()):
            for t in range(seq_len):
                if position + t < epoch_tokens:
                    inputs[ids[t]] += 1
                if position + t + 1 < epoch_tokens and labs[t] != -100:
                    labels[labs[t]] += 1
            position += seq_len
    assert inputs == Counter(t for d in docs for t in d)
    assert labels == Counter(t for d in docs for t in d[1:])  # each doc's first is never a label
    assert loader.report()[0]["epoch"] >= 1


def test_bestfit_never_truncates_and_counts_padding(tmp_path):
    seq_len = 50
    docs = documents(1, 300, 130)  # many longer than T: split into T-sized pieces
    (files,) = write_sources(tmp_path, [docs])
    loader = PackedLoader([files], seq_len, 1, packing="bestfit", window=40, num_threads=0)
    seen, padding, rows = Counter(), 0, 0
    while loader._loader.row_epoch(0, rows) == 0:
        compact = loader.next_compact()
        used = int(compact.row_used[0])
        seen.update(compact.tokens[0, :used].tolist())
        padding += seq_len - used
        starts = compact.segment_starts.tolist() + [used]
        assert all(0 < b - a <= seq_len for a, b in zip(starts, starts[1:]))
        rows += 1
    total = sum(map(len, docs))
    assert seen == Counter(t for d in docs for t in d)
    assert padding == rows * seq_len - total
    assert padding / (rows * seq_len) < 0.05, "best-fit should leave little padding"


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
def test_no_label_crosses_a_document(tmp_path, batch_device, packing):
    sources = write_sources(tmp_path, [documents(2, 150, 40), documents(3, 100, 90)])
    loader = PackedLoader(sources, 24, 3, packing=packing, weights=[1, 2], num_threads=2,
                          device=batch_device)

    for _ in range(30):
        compact = loader.next_compact()
        b = expand_on(compact, batch_device)
        positions, labels, inputs = b.position_ids, b.labels, b.input_ids
        used = torch.from_numpy(compact.row_used.astype(np.int64)).to(batch_device)
        real = torch.arange(24, device=batch_device)[None, :] < used[:, None]
        assert bool((labels[~real] == -100).all())  # padding is never a target
        same_doc = (positions[:, 1:] == positions[:, :-1] + 1) & real[:, 1:]
        assert bool((labels[:, :-1][same_doc] == inputs[:, 1:][same_doc]).all())
        assert bool((labels[:, :-1][~same_doc] == -100).all())
        lengths = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist()
        assert sum(lengths) == b.num_tokens and max(lengths) == b.max_seqlen
        starts = set(b.cu_seqlens[:-1].tolist())
        assert starts == {i for i, p in enumerate(positions.flatten().tolist()) if p == 0}


def test_ranks_are_disjoint_and_cover_the_global_stream(tmp_path, batch_device):
    sources = write_sources(tmp_path, [documents(4, 80, 30), documents(5, 80, 30)])
    single = PackedLoader(sources, 16, 6, weights=[3, 1], num_threads=0, device=batch_device)
    ranks = [PackedLoader(sources, 16, 2, weights=[3, 1], rank=r, world_size=3, num_threads=2,
                          device=batch_device) for r in range(3)]
    for _ in range(10):
        whole = next(single)
        parts = [next(loader) for loader in ranks]
        rows = sorted(g for p in parts for g in p.global_rows.tolist())
        assert rows == sorted(whole.global_rows.tolist())
        for r, part in enumerate(parts):  # rank r holds every third row of the global step
            assert part.global_rows.tolist() == whole.global_rows[r::3].tolist()
            assert bool((part.input_ids == whole.input_ids[r::3]).all())


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
def test_resume_equals_the_uninterrupted_stream_on_any_world_size(tmp_path, batch_device,
                                                                  packing):
    sources = write_sources(tmp_path, [documents(6, 60, 50), documents(7, 90, 20)])
    options = dict(weights=[0.6, 0.4], packing=packing, seed=3, window=10, device=batch_device)
    reference = PackedLoader(sources, 20, 4, num_threads=2, **options)
    expected = [next(reference).input_ids for _ in range(25)]
    rng = np.random.default_rng(0)
    for stop in sorted(rng.choice(np.arange(1, 24), 4, replace=False).tolist()):
        # Two ranks of 2 rows run `stop` steps, then one rank of 4 rows resumes (2 -> 1).
        pair = [PackedLoader(sources, 20, 2, rank=r, world_size=2, **options) for r in range(2)]
        for _ in range(stop):
            for loader in pair:
                next(loader)
        state = pair[0].state_dict()
        assert state == pair[1].state_dict()
        resumed = PackedLoader(sources, 20, 4, num_threads=2, **options)
        resumed.load_state_dict(state)
        for k in range(stop, 25):
            assert bool((next(resumed).input_ids == expected[k]).all()), (stop, k)
    # And 1 -> 2: the single loader's state continues on two ranks.
    single = PackedLoader(sources, 20, 4, **options)
    for _ in range(5):
        next(single)
    halves = [PackedLoader(sources, 20, 2, rank=r, world_size=2, **options) for r in range(2)]
    for loader in halves:
        loader.load_state_dict(single.state_dict())
    for k in range(5, 10):
        a, b = next(halves[0]).input_ids, next(halves[1]).input_ids
        assert bool((a == expected[k][0::2]).all()) and bool((b == expected[k][1::2]).all())


@SETTINGS
@given(weights=st.lists(st.floats(0.01, 10), min_size=2, max_size=4),
       packing=st.sampled_from(["concat", "bestfit"]))
def test_mixture_stays_within_one_row_of_its_target(tmp_path_factory, weights, packing):
    seq_len = 16
    corpora = [documents(10 + s, 30 + 20 * s, 40) for s in range(len(weights))]
    sources = write_sources(tmp_path_factory.mktemp("m"), corpora)
    loader = PackedLoader(sources, seq_len, 1, weights=weights, packing=packing, num_threads=0)
    target = np.array(weights) / sum(weights)
    for _ in range(400):
        tokens = np.array(loader.next_compact().state_after[2])
        assert np.all(np.abs(tokens - target * tokens.sum()) <= seq_len), tokens
    epochs = [entry["epoch"] for entry in loader.report()]
    assert max(epochs) >= 1  # small sources wrapped into their next (reshuffled) epoch


def test_bad_input_gets_clear_errors(tmp_path, tokenizer_dir, big_vocab_tokenizer_dir):
    good = write_sources(tmp_path, [documents(8, 10, 9)])[0]
    empty, _ = write_megatron(tmp_path / "empty", [[], []], "uint16")  # all documents empty
    with pytest.raises(ValueError, match=r"empty\.bin: file is empty"):
        PackedLoader([[empty]], 8, 1)
    with pytest.raises(ValueError, match="empty list of shard files"):
        PackedLoader([good, []], 8, 1)
    with pytest.raises(ValueError, match="at least one source"):
        PackedLoader([], 8, 1)
    for weights in ([1, -1], [0, 0], [float("nan"), 1], [1]):
        with pytest.raises(ValueError, match="weights"):
            PackedLoader([good, good], 8, 1, weights=weights)
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        PackedLoader([good], 1, 1)
    with pytest.raises(ValueError, match="packing must be one of"):
        PackedLoader([good], 8, 1, packing="greedy")
    with pytest.raises(ValueError, match="rank"):
        PackedLoader([good], 8, 1, rank=2, world_size=2)

    (tmp_path / "a.txt").write_text("w1 w2 hello\nthere w3\n")
    prepare([tmp_path / "a.txt"], tmp_path / "small", tokenizer_dir, split_lines=True, workers=1)
    prepare([tmp_path / "a.txt"], tmp_path / "big", big_vocab_tokenizer_dir, split_lines=True,
            workers=1)
    with pytest.raises(ValueError, match="different tokenizer"):
        PackedLoader({"domain": tmp_path / "small", "general": tmp_path / "big"}, 8, 1)
    loader = PackedLoader({"domain": tmp_path / "small"}, 8, 1)
    assert loader.pad_id == 1  # the tokenizer's EOS
    other = PackedLoader({"domain": tmp_path / "small"}, 16, 1)
    with pytest.raises(ValueError, match="seq_len=8 but this loader has 16"):
        other.load_state_dict(loader.state_dict())


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
def test_index_cache_is_keyed_by_its_inputs_and_survives_corruption(tmp_path, packing):
    sources = write_sources(tmp_path, [documents(20, 120, 70)])
    cache = tmp_path / "cache"

    def first_batches(**kwargs):
        loader = PackedLoader(sources, 32, 4, packing=packing, num_threads=0, **kwargs)
        return [next(loader).input_ids for _ in range(12)]

    fresh = first_batches(index_cache=False)
    assert not cache.exists()
    assert all(bool((a == b).all()) for a, b in zip(first_batches(index_cache=cache), fresh))
    files = sorted(cache.glob("*.cptidx"))
    assert files and not list(cache.glob("*.partial*"))
    stamps = [f.stat().st_mtime_ns for f in files]
    assert all(bool((a == b).all()) for a, b in zip(first_batches(index_cache=cache), fresh))
    assert [f.stat().st_mtime_ns for f in files] == stamps  # read back, not rebuilt
    # A different seed is a different key; a damaged file is rebuilt, not trusted.
    first_batches(index_cache=cache, seed=1)
    assert len(list(cache.glob("*.cptidx"))) == 2 * len(files)
    files[0].write_bytes(files[0].read_bytes()[:-5])
    assert all(bool((a == b).all()) for a, b in zip(first_batches(index_cache=cache), fresh))
    assert files[0].stat().st_size > 0 and files[0].stat().st_mtime_ns != stamps[0]


def test_unwritable_index_cache_is_refused(tmp_path):
    sources = write_sources(tmp_path, [documents(21, 10, 9)])
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="index_cache=False"):
        PackedLoader(sources, 8, 1, index_cache=blocker / "sub")


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
def test_a_new_mixture_phase_starts_at_the_exact_row_and_resumes(tmp_path, batch_device,
                                                                 packing):
    sources = write_sources(tmp_path, [documents(8, 80, 40), documents(9, 80, 40)])
    options = dict(packing=packing, seed=5, window=10, device=batch_device)
    loader = PackedLoader(sources, 16, 4, weights=[1, 1], num_threads=2, **options)
    before = [next(loader) for _ in range(6)]
    assert {0, 1} <= set(torch.cat([b.sources for b in before]).tolist())  # a real mix
    rows_before = [entry["rows"] for entry in loader.report()]
    loader.set_weights([1, 0])  # e.g. only the domain source for the end of the run
    after = [next(loader) for _ in range(5)]
    assert int(after[0].global_rows[0]) == 6 * 4  # the very next global row
    assert set(torch.cat([b.sources for b in after]).tolist()) == {0}
    # Source 0 continues from its own row (nothing replayed, nothing skipped).
    assert loader.report()[0]["rows"] == rows_before[0] + 5 * 4
    assert loader.report()[1]["rows"] == rows_before[1]
    # Resuming inside the new phase (a loader built with the phase's weights) continues it.
    state = loader.state_dict()
    expected = [next(loader).input_ids for _ in range(3)]
    resumed = PackedLoader(sources, 16, 4, weights=[1, 0], num_threads=0, **options)
    resumed.load_state_dict(state)
    for want in expected:
        assert torch.equal(next(resumed).input_ids, want)


def test_a_prefix_field_is_kept_out_of_the_loss(tmp_path, big_vocab_tokenizer_dir,
                                                 batch_device):
    # Word-level tokens: prefix words are w0..w999, text words w1000 and up, so a target
    # token's id says whether it belongs to a prefix. On CUDA the masks (a twin loader's
    # labels) are applied to the batch on the device.
    import json
    import random

    rng = random.Random(0)
    with open(tmp_path / "docs.jsonl", "w") as f:
        for _ in range(300):
            url = " ".join(f"w{rng.randrange(1000)}" for _ in range(rng.randint(0, 4)))
            text = " ".join(f"w{rng.randrange(1000, 70000)}" for _ in range(rng.randint(1, 30)))
            f.write(json.dumps({"url": url or None, "text": text}) + "\n")
    prepare([tmp_path / "docs.jsonl"], tmp_path / "out", big_vocab_tokenizer_dir,
            prefix_field="url", prefix_template="{}", workers=2, progress=False)
    eos = 70_001
    for masked in (True, False):
        loader = PackedLoader([tmp_path / "out"], 64, 4, num_threads=2, loss_masks=masked,
                              device=batch_device)
        for _ in range(20):
            batch = next(loader)
            assert batch.labels.device.type == batch_device.type
            targets, labels = batch.input_ids[:, 1:], batch.labels[:, :-1]
            in_prefix = targets < 1000
            dropped = labels == -100
            document_end = batch.input_ids[:, :-1] == eos
            if masked:
                assert dropped[in_prefix].all()
                assert torch.equal(dropped, in_prefix | document_end)
            else:
                assert torch.equal(dropped, document_end)
            assert torch.equal(labels[~dropped], targets[~dropped])
