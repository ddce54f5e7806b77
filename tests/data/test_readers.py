"""Files written by the independent writers read back exactly, in every supported format."""

import gc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from independent_writers import write_headerless, write_llmc, write_megatron

from cptfast.data import open_shard

documents_strategy = st.lists(st.lists(st.integers(0, 65535), min_size=1, max_size=40),
                              min_size=1, max_size=30)


def assert_documents(shard, expected):
    assert shard.num_documents == len(expected) == len(shard)
    assert shard.num_tokens == sum(len(d) for d in expected)
    for i, doc in enumerate(expected):
        assert shard.document(i).tolist() == list(doc), f"document {i}"
    assert shard[-1].tolist() == list(expected[-1])


@settings(max_examples=40, deadline=None)
@given(docs=documents_strategy, dtype=st.sampled_from(["uint16", "int32", "int64"]))
def test_megatron_round_trip(tmp_path_factory, docs, dtype):
    prefix = tmp_path_factory.mktemp("m") / "shard"
    write_megatron(prefix, docs, dtype)
    for path in (f"{prefix}.bin", f"{prefix}.idx", prefix):
        shard = open_shard(path)
        assert shard.format == "megatron" and shard.dtype == dtype
        assert_documents(shard, docs)
        assert shard.max_token_id() == max(max(d) for d in docs)


def test_megatron_documents_of_several_sequences_and_multimodal_modes(tmp_path):
    sequences = [[1, 2], [3], [4, 5, 6], [7], [8, 9]]
    write_megatron(tmp_path / "s", sequences, "uint16", document_starts=[0, 2, 3], modes=True)
    shard = open_shard(tmp_path / "s.bin")
    assert_documents(shard, [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    assert shard.document_offsets().tolist() == [0, 3, 6, 9]


def test_megatron_zero_length_sequence_is_an_empty_document(tmp_path):
    write_megatron(tmp_path / "s", [[5], [], [6, 7]], "uint8")
    shard = open_shard(tmp_path / "s.bin")
    assert [shard.document(i).tolist() for i in range(3)] == [[5], [], [6, 7]]


def test_views_are_read_only_zero_copy_and_keep_the_mapping_alive(tmp_path):
    write_megatron(tmp_path / "s", [[1, 2, 3], [4, 5]], "uint16")
    shard = open_shard(tmp_path / "s.bin")
    doc, tokens = shard.document(1), shard.tokens()
    assert not doc.flags.writeable and not doc.flags.owndata
    with pytest.raises(ValueError):
        doc[0] = 9
    # The document view aliases the same memory as the whole-file view.
    assert doc.__array_interface__["data"][0] == tokens.__array_interface__["data"][0] + 3 * 2
    del shard
    gc.collect()
    assert doc.tolist() == [4, 5] and tokens.tolist() == [1, 2, 3, 4, 5]


def test_document_index_out_of_range(tmp_path):
    write_megatron(tmp_path / "s", [[1], [2]], "uint16")
    shard = open_shard(tmp_path / "s.bin")
    with pytest.raises(IndexError, match="out of range"):
        shard.document(2)
    with pytest.raises(IndexError):
        shard.document(-3)


def assert_llmc_documents(shard, expected):
    assert [shard.document(i).tolist() for i in range(len(shard))] == expected
    assert shard.document_tokens == sum(len(d) for d in expected)


def test_gpt2_llmc_documents_end_with_their_end_of_text(tmp_path):
    # llm.c writes [EOT] + tokens per document and trains on the stream as it is: the EOT
    # after a document is that document's last label.
    eot = 50256
    bodies = [[11, 12, 13], [], [14], [7, 7, 7, 7]]
    write_llmc(tmp_path / "x_train_000001.bin", [t for b in bodies for t in [eot] + b])
    shard = open_shard(tmp_path / "x_train_000001.bin")
    assert shard.format == "llmc" and shard.dtype == "uint16"
    assert (shard.delimiter, shard.delimiter_role) == (eot, "end")
    # The leading EOT ends nothing; the last document's end is in the next shard (cut).
    assert_llmc_documents(shard, [[11, 12, 13, eot], [eot], [14, eot], [7, 7, 7, 7]])
    assert shard.num_tokens == 12 and shard.cut_documents == 1


def test_llama3_llmc_documents_begin_with_their_bos(tmp_path):
    bos = 128000
    docs = [[bos, 11, 12, 13], [bos], [bos, 14], [bos, 7, 7, 7, 7]]
    write_llmc(tmp_path / "x_train_000001.bin", [t for d in docs for t in d], magic=20240801,
               version=7)
    shard = open_shard(tmp_path / "x_train_000001.bin")
    assert shard.dtype == "uint32" and (shard.delimiter, shard.delimiter_role) == (bos, "start")
    assert_llmc_documents(shard, docs)
    assert shard.cut_documents == 0


def test_llmc_leading_fragment_custom_delimiter_and_role(tmp_path):
    # llm.c's shard writers cut documents at shard boundaries: the file may start mid-document.
    write_llmc(tmp_path / "a.bin", [5, 6, 50256, 1, 2, 50256, 3])
    shard = open_shard(tmp_path / "a.bin")
    assert_llmc_documents(shard, [[5, 6, 50256], [1, 2, 50256], [3]])
    assert shard.cut_documents == 2
    assert_llmc_documents(open_shard(tmp_path / "a.bin", delimiter_role="start"),
                          [[5, 6], [50256, 1, 2], [50256, 3]])
    assert_llmc_documents(open_shard(tmp_path / "a.bin", format="llmc", delimiter=6),
                          [[5, 6], [50256, 1, 2, 50256, 3]])
    with pytest.raises(ValueError, match="delimiter_role must be one of"):
        open_shard(tmp_path / "a.bin", delimiter_role="middle")


@settings(max_examples=30, deadline=None)
@given(docs=st.lists(st.lists(st.integers(0, 99), min_size=0, max_size=20), min_size=1,
                     max_size=20),
       tail=st.lists(st.integers(0, 99), max_size=5), dtype=st.sampled_from(["uint16", "uint32"]))
def test_headerless_documents_end_at_eos(tmp_path_factory, docs, tail, dtype):
    eos = 100
    expected = [d + [eos] for d in docs] + ([tail] if tail else [])
    path = write_headerless(tmp_path_factory.mktemp("h") / "train.bin",
                            [t for d in expected for t in d], dtype)
    shard = open_shard(path, format="headerless", dtype=dtype, eos_id=eos)
    assert shard.format == "headerless" and shard.dtype == dtype
    assert_documents(shard, expected)


def test_headerless_needs_dtype_and_eos(tmp_path):
    path = write_headerless(tmp_path / "train.bin", [1, 2, 3])
    with pytest.raises(ValueError, match="dtype="):
        open_shard(path)


def test_token_range_check_accepts_exact_vocab(tmp_path):
    write_megatron(tmp_path / "s", [[0, 511], [3]], "uint16")
    open_shard(tmp_path / "s.bin", vocab_size=512)  # 511 < 512: fine


def test_tokens_view_matches_numpy_memmap(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, rng.integers(1, 50)).tolist() for _ in range(200)]
    bin_path, _ = write_megatron(tmp_path / "s", docs, "uint16")
    shard = open_shard(bin_path)
    np.testing.assert_array_equal(shard.tokens(), np.memmap(bin_path, dtype=np.uint16, mode="r"))
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    np.testing.assert_array_equal(shard.document_offsets(), offsets)
