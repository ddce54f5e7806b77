"""Data sources named every way a user names them, read from files of independent writers:
Megatron pairs without a manifest (prefix with dots, file, directory, glob, list), llm.c shard
globs (GPT-2 end-of-text as a label, Llama-3 BOS as a document's start), nanoGPT headerless
files, datatrove .ds files, mixed token dtypes; and the epoch-index cache that cannot be
fooled by a re-split source, a damaged file or a forged one."""

import shutil
import struct

import numpy as np
import pytest
import torch
from independent_writers import (write_datatrove, write_headerless, write_llmc,
                                 write_llmc_shards, write_megatron)

from cptfast.data import PackedLoader, open_source
from cptfast.errors import ShardFormatError

EOT, BOS = 50256, 128000


def random_documents(seed: int, count: int, longest: int, vocab: int = 1000) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(1, longest + 1)).tolist() for _ in range(count)]


def documents_of(opened) -> list[list[int]]:
    return [r.document(i).tolist() for r in opened.readers for i in range(len(r))]


def assert_same_stream(a: PackedLoader, b: PackedLoader, batches: int = 6) -> None:
    for _ in range(batches):
        x, y = next(a), next(b)
        for name in ("input_ids", "labels", "position_ids", "cu_seqlens"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name


def test_every_form_of_a_megatron_source_without_a_manifest(tmp_path):
    docs = random_documents(0, 40, 30)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    # Megatron names its outputs <prefix>_text_document: dots in the prefix are common.
    first = corpus / "corpus-v1.1_text_document"
    second = corpus / "corpus-v1.2_text_document"
    write_megatron(first, docs[:25], "uint16")
    write_megatron(second, docs[25:], "uint16")
    both = [f"{first}.bin", f"{second}.bin"]
    forms = [str(corpus), f"{corpus}/*.bin", f"{corpus}/*", f"{corpus}/corpus-v1.?_text_*.idx",
             [str(first), str(second)], [f"{first}.idx", f"{second}.bin"]]
    for form in forms:
        opened = open_source(form, name="web")
        assert documents_of(opened) == docs, form
        assert_same_stream(PackedLoader({"web": form}, 16, 2, num_threads=0),
                           PackedLoader({"web": both}, 16, 2, num_threads=0))
    assert documents_of(open_source(str(first))) == docs[:25]  # the bare prefix


def llmc_stream(paths) -> np.ndarray:
    """The tokens of llm.c shards, in order: the stream llm.c trains on."""
    return np.concatenate([np.frombuffer(p.read_bytes()[1024:], dtype=np.uint16) for p in paths])


def row_documents(batch) -> list[list[int]]:
    """The documents of a batch's single row, cut where positions restart."""
    inputs, positions = batch.input_ids[0].tolist(), batch.position_ids[0].tolist()
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    return [inputs[a:b] for a, b in zip(starts, starts[1:])]


def test_gpt2_llmc_glob_trains_end_of_text_as_a_label(tmp_path):
    docs = random_documents(1, 60, 25)
    paths = write_llmc_shards(tmp_path, docs, shard_tokens=97)
    assert len(paths) > 3
    source = {"web": str(tmp_path / "fineweb_train_*.bin")}
    total = open_source(source["web"]).num_tokens
    assert total == len(llmc_stream(paths)) - 1  # all but the leading end-of-text
    # One row holding the whole epoch: its labels are every token but each document's first.
    loader = PackedLoader(source, total, 1, num_threads=0, index_cache=False)
    batch = next(loader)
    # The documents are the writer's, each ended by the end-of-text after it (the last one
    # has none), whole even where the writer cut them across shards.
    expected = [d + [EOT] for d in docs[:-1]] + [docs[-1]]
    assert sorted(row_documents(batch)) == sorted(expected)
    labels, positions = batch.labels[0], batch.position_ids[0]
    eot_labels = (labels == EOT).nonzero().flatten()
    # As often as in llm.c's objective on the stream: every end-of-text after the first token.
    assert len(eot_labels) == int((llmc_stream(paths)[1:] == EOT).sum()) == len(docs) - 1
    # ... and each one ends its document: the next position starts a new one.
    after = eot_labels + 2
    assert bool((positions[after[after < total]] == 0).all())
    # Only the last document is cut (it has no end-of-text): the source's own edge.
    assert loader.report()[0]["cut_documents"] == 1


@pytest.mark.parametrize("shard_tokens", [1, 2, 7, 61, 10_000])
@pytest.mark.parametrize("magic", [20240520, 20240801])
def test_documents_cut_at_shard_boundaries_continue_in_the_next_shard(tmp_path, magic,
                                                                      shard_tokens):
    # Tiny shards make documents cross several of them.
    gpt2 = magic == 20240520
    delimiter = EOT if gpt2 else BOS
    docs = random_documents(9, 20, 12)
    write_llmc_shards(tmp_path, docs, shard_tokens, eot=delimiter, magic=magic,
                      version=1 if gpt2 else 7)
    source = {"web": str(tmp_path / "*.bin")}
    total = open_source(source["web"]).num_tokens
    loader = PackedLoader(source, total, 1, num_threads=0, index_cache=False)
    expected = ([d + [EOT] for d in docs[:-1]] + [docs[-1]] if gpt2
                else [[BOS] + d for d in docs])
    assert sorted(row_documents(next(loader))) == sorted(expected)
    assert loader.report()[0]["cut_documents"] == (1 if gpt2 else 0)


def test_llama3_llmc_documents_begin_with_their_bos(tmp_path):
    docs = random_documents(2, 30, 20)
    write_llmc_shards(tmp_path, docs, shard_tokens=61, eot=BOS, magic=20240801, version=7)
    opened = open_source(str(tmp_path / "*.bin"))
    total = opened.num_tokens
    batch = next(PackedLoader({"web": str(tmp_path / "*.bin")}, total, 1, num_threads=0,
                              index_cache=False))
    inputs, labels, positions = batch.input_ids[0], batch.labels[0], batch.position_ids[0]
    assert bool((positions[inputs == BOS] == 0).all())  # every BOS begins a document
    assert not bool((labels == BOS).any())  # and is never predicted across documents
    # With the role overridden the BOS ends documents instead (a label).
    ended = PackedLoader({"web": {"path": str(tmp_path / "*.bin"), "delimiter_role": "end"}},
                         total, 1, num_threads=0, index_cache=False)
    assert bool((next(ended).labels == BOS).any())


def test_nanogpt_headerless_and_datatrove_sources(tmp_path):
    docs = random_documents(3, 30, 20)
    write_headerless(tmp_path / "train.bin", [t for d in docs for t in d + [EOT]], "uint16")
    table = {"path": str(tmp_path / "train.bin"), "format": "headerless", "dtype": "uint16",
             "eos_id": EOT}
    assert documents_of(open_source(table)) == [d + [EOT] for d in docs]
    loader = PackedLoader({"web": table}, 16, 2, num_threads=0)
    assert loader.pad_id == EOT  # the end-of-text pads, as a manifest's EOS would
    with pytest.raises(ValueError, match="headerless token file carries no dtype"):
        open_source(str(tmp_path / "train.bin"))

    (tmp_path / "dt").mkdir()
    write_datatrove(tmp_path / "dt" / "000_shard.ds", docs[:12], "uint32")
    write_datatrove(tmp_path / "dt" / "001_shard.ds", docs[12:], "uint16", metadata=False)
    for form in (str(tmp_path / "dt"), str(tmp_path / "dt" / "*.ds"),
                 str(tmp_path / "dt" / "*")):
        opened = open_source(form)
        assert [r.format for r in opened.readers] == ["datatrove", "datatrove"]
        assert [r.dtype for r in opened.readers] == ["uint32", "uint16"]
        assert documents_of(opened) == docs
    index = tmp_path / "dt" / "000_shard.ds.index"  # its .ds.metadata gives the dtype
    index.write_bytes(index.read_bytes()[:-8])
    with pytest.raises(ShardFormatError, match="000_shard.ds.index.*last document ends"):
        open_source(str(tmp_path / "dt"))


def test_sources_of_different_dtypes_mix(tmp_path):
    docs = random_documents(4, 50, 30)
    write_megatron(tmp_path / "a", docs[:20], "uint16")
    write_megatron(tmp_path / "b", docs[20:], "int32")
    stream = [t for d in docs for t in [BOS] + d]
    write_llmc(tmp_path / "c.bin", stream, magic=20240801, version=7)  # uint32
    mixed = {"a": str(tmp_path / "a"), "bc": [str(tmp_path / "b.bin"), str(tmp_path / "c.bin")]}
    # The oracle: the same documents, all in one dtype.
    write_megatron(tmp_path / "a32", docs[:20], "int32")
    c_docs = documents_of(open_source(str(tmp_path / "c.bin")))
    write_megatron(tmp_path / "bc32", docs[20:] + c_docs, "int32")
    same = {"a": str(tmp_path / "a32"), "bc": str(tmp_path / "bc32")}
    for packing in ("concat", "bestfit"):
        assert_same_stream(PackedLoader(mixed, 24, 3, packing=packing, window=8),
                           PackedLoader(same, 24, 3, packing=packing, window=8), batches=10)


def test_foreign_sources_are_checked_against_the_vocabulary(tmp_path):
    write_megatron(tmp_path / "ok", [[1, 2, 3], [4]], "uint16")
    write_megatron(tmp_path / "bad", [[1, 2], [3, 700, 5]], "uint16")
    PackedLoader({"web": str(tmp_path / "ok")}, 4, 1, vocab_size=5)
    with pytest.raises(ShardFormatError) as info:
        PackedLoader({"web": str(tmp_path / "ok"), "code": str(tmp_path / "bad")}, 4, 1,
                     vocab_size=512)
    message = str(info.value)
    for part in ("source 'code'", "bad.bin", "token id 700", "512 rows"):
        assert part in message, message


def test_a_directory_of_llmc_train_and_val_shards_asks_for_a_split(tmp_path):
    docs = random_documents(11, 20, 10)
    write_llmc_shards(tmp_path, docs, shard_tokens=60)
    write_llmc(tmp_path / "fineweb_val_000000.bin", [EOT, 1, 2, 3])
    with pytest.raises(ValueError, match="both training and validation shards"):
        PackedLoader({"web": str(tmp_path)}, 8, 1)
    PackedLoader({"web": str(tmp_path / "*_train_*.bin")}, 8, 1)


@pytest.mark.parametrize("spec,pattern", [
    ("{tmp}/missing", "is not a file, a directory, a Megatron prefix"),
    ("{tmp}/nothing_*.bin", "matches no file"),
    ("{tmp}/empty_dir", "no manifest.json and no token files"),
    ({"path": "{tmp}/x.bin", "eos": 3}, "unknown keys"),
])
def test_sources_named_wrongly_get_clear_errors(tmp_path, spec, pattern):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "notes.txt").write_text("hello")
    if isinstance(spec, dict):
        spec = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in spec.items()}
    else:
        spec = spec.format(tmp=tmp_path)
    with pytest.raises(ValueError, match=pattern) as info:
        PackedLoader({"general": spec}, 8, 1)
    assert "source 'general'" in str(info.value)


# ---- the epoch-index cache --------------------------------------------------------------------

@pytest.mark.parametrize("packing", ["concat", "bestfit"])
def test_reopening_with_another_delimiter_under_the_same_cache(tmp_path, packing):
    # The user opens a token file with the wrong end-of-document id, notices, and re-opens it
    # with the right one: the cached index of the first split must not be reused.
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, 50, 3000)
    tokens[rng.choice(3000, 200, replace=False)] = 7
    tokens[rng.choice(3000, 25, replace=False)] = 9
    write_headerless(tmp_path / "train.bin", tokens.tolist(), "uint16")
    cache = tmp_path / "cache"

    def loader(eos_id, index_cache):
        table = {"path": str(tmp_path / "train.bin"), "format": "headerless",
                 "dtype": "uint16", "eos_id": eos_id}
        return PackedLoader({"web": table}, 64, 4, packing=packing, window=16,
                            index_cache=index_cache)

    for _ in zip(range(8), loader(7, cache)):
        pass
    assert_same_stream(loader(9, cache), loader(9, False), batches=12)
    assert_same_stream(loader(7, cache), loader(7, False), batches=12)


def cache_files(loader: PackedLoader):
    return sorted(__import__("glob").glob(loader._cache_prefixes[0] + "-e*.cptidx"))


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
def test_damaged_and_stale_cache_files_are_rebuilt(tmp_path, packing):
    write_megatron(tmp_path / "a", random_documents(6, 300, 40), "uint16")
    write_megatron(tmp_path / "b", random_documents(7, 200, 40), "uint16")
    cache = tmp_path / "cache"

    def make(name, index_cache=cache):
        return PackedLoader({"web": str(tmp_path / name)}, 32, 4, packing=packing,
                            index_cache=index_cache, num_threads=0)

    for _ in zip(range(3), make("a")):
        pass
    for _ in zip(range(3), make("b")):
        pass
    a_file, b_file = cache_files(make("a"))[0], cache_files(make("b"))[0]
    original = open(a_file, "rb").read()
    damages = {
        "a flipped bit in the arrays": lambda d: d[:len(d) // 2] + bytes([d[len(d) // 2] ^ 4])
        + d[len(d) // 2 + 1:],
        "a flipped bit in the header": lambda d: d[:20] + bytes([d[20] ^ 1]) + d[21:],
        "truncated": lambda d: d[:-12],
        "empty": lambda d: b"",
        "another source's index": lambda d: open(b_file, "rb").read(),
    }
    for what, damage in damages.items():
        with open(a_file, "wb") as f:
            f.write(damage(original))
        assert_same_stream(make("a"), make("a", index_cache=False), batches=4)
        assert open(a_file, "rb").read() == original, what  # rebuilt and rewritten


MASK = (1 << 64) - 1
CHUNK = 1 << 18


def checksum_add(state, data: bytes):
    """One step of the cache's checksum, written from its description: four lanes of
    Fletcher sums; word j of every 32-byte block goes to lane j, the remaining whole words to
    lane 0, then the zero-padded tail word xored with (length << 56)."""
    a, b = state
    blocks = len(data) - len(data) % 32
    for offset in range(0, blocks, 32):
        for j, (word,) in enumerate(struct.iter_unpack("<Q", data[offset:offset + 32])):
            a[j] = (a[j] + word) & MASK
            b[j] = (b[j] + a[j]) & MASK
    whole = len(data) - len(data) % 8
    for (word,) in struct.iter_unpack("<Q", data[blocks:whole]):
        a[0] = (a[0] + word) & MASK
        b[0] = (b[0] + a[0]) & MASK
    tail = int.from_bytes(data[whole:].ljust(8, b"\0"), "little")
    a[0] = (a[0] + (tail ^ ((len(data) << 56) & MASK))) & MASK
    b[0] = (b[0] + a[0]) & MASK


def checksum(pieces, chunked: bool):
    """(sum_a, sum_b) of byte strings (arrays are summed in chunks of 2^18 bytes)."""
    state = ([0x9E3779B97F4A7C15, 0, 0, 0], [0, 0, 0, 0])
    for data in pieces:
        step = CHUNK if chunked else max(len(data), 1)
        for start in range(0, len(data), step) if chunked else [0]:
            checksum_add(state, data[start:start + step])
    fold = [sum(m * lane for m, lane in zip((1, 3, 5, 7), lanes)) & MASK for lanes in state]
    return fold[0], fold[1]


def forge_concat_epoch(documents: int, tokens: int, order, stream_start) -> bytes:
    magic = b"CPTIDX2\0"
    arrays = [np.asarray(order, "<u4").tobytes(), np.asarray(stream_start, "<i8").tobytes(),
              b"", b""]
    sums = checksum(arrays, chunked=True)
    header = struct.pack("<8Q", documents, tokens, len(order), len(stream_start), 0, 0, *sums)
    c = checksum([magic, header], chunked=False)
    header_sum = c[0] ^ ((c[1] * 0xFF51AFD7ED558CCD) & MASK)
    return magic + header + struct.pack("<Q", header_sum) + b"".join(arrays)


def test_an_index_pointing_outside_the_source_raises_a_named_error(tmp_path):
    docs = random_documents(8, 10, 20)
    write_megatron(tmp_path / "a", docs, "uint16")
    cache = tmp_path / "cache"
    probe = PackedLoader({"web": str(tmp_path / "a")}, 16, 2, index_cache=cache)
    next(probe)
    path = cache_files(probe)[0]
    lengths = [len(d) for d in docs]
    honest = forge_concat_epoch(10, sum(lengths), range(10), np.cumsum([0] + lengths))
    open(path, "wb").write(honest)  # checksums right: trusted, documents in file order
    first = next(PackedLoader({"web": str(tmp_path / "a")}, 16, 1, index_cache=cache))
    assert first.input_ids[0].tolist() == [t for d in docs for t in d][:16]
    # ... so a forged order naming document 12 of 10 reaches the gathering code, which
    # refuses it by name instead of reading out of bounds.
    order = [12] + list(range(1, 10))
    starts = np.cumsum([0, lengths[0]] + lengths[1:])
    open(path, "wb").write(forge_concat_epoch(10, sum(lengths), order, starts))
    with pytest.raises(ShardFormatError, match="epoch index is broken.*document 12"):
        next(PackedLoader({"web": str(tmp_path / "a")}, 16, 2, index_cache=cache))
    shutil.rmtree(cache)


def test_cptfast_verify_checks_foreign_shards(tmp_path, capsys):
    from cptfast.cli import main as cli_main

    docs = random_documents(10, 30, 20)
    write_llmc_shards(tmp_path, docs, shard_tokens=150)
    pattern = str(tmp_path / "fineweb_train_*.bin")
    assert cli_main(["verify", pattern, "--vocab-size", "50257"]) == 0
    out = capsys.readouterr().out
    tokens = sum(len(d) + 1 for d in docs) - 1
    assert f"{len(docs)} documents (1 cut at the source's edges), {tokens:,} tokens" in out
    assert out.count("llmc,") >= 2
    assert cli_main(["verify", pattern, "--vocab-size", "1000"]) == 1  # 50256 >= 1000
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "token id 50256" in err[0] and "1000 rows" in err[0], err
    last = sorted(tmp_path.glob("fineweb_train_*.bin"))[-1]
    last.write_bytes(last.read_bytes()[:-3])  # a torn write
    assert cli_main(["verify", pattern]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and last.name in err[0] and "truncated" in err[0], err
