"""Every kind of damage to a shard raises ShardFormatError naming the file, the byte offset
and a fix; nothing opens silently wrong."""

import json
import re
import struct

import pytest
from independent_writers import write_headerless, write_llmc, write_megatron

from cptfast.data import open_shard, open_shards, prepare, verify
from cptfast.errors import ShardFormatError

SEQUENCES = [[1, 2, 3], [4], [5, 6]]  # n = 3 sequences, uint16
N = len(SEQUENCES)
LENGTHS_AT, POINTERS_AT = 34, 34 + 4 * N
DOC_IDX_AT = POINTERS_AT + 8 * N
IDX_SIZE = DOC_IDX_AT + 8 * (N + 1)


def expect_error(path, byte, pattern, **kwargs):
    with pytest.raises(ShardFormatError) as info:
        open_shard(path, **kwargs)
    message = str(info.value)
    assert str(path).split(".")[0] in message, message
    if byte is not None:
        assert f"(at byte {byte})" in message, message
    assert re.search(pattern, message), message
    return message


@pytest.fixture
def megatron(tmp_path):
    bin_path, idx_path = write_megatron(tmp_path / "s", SEQUENCES, "uint16")
    assert len(idx_path.read_bytes()) == IDX_SIZE
    return bin_path, idx_path


def patch(path, at, data):
    raw = bytearray(path.read_bytes())
    raw[at:at + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("name,at,data,byte,pattern", [
    ("magic", 0, b"XMIDIDX", 0, "wrong magic"),
    ("version", 9, struct.pack("<Q", 2), 9, "unsupported index version 2"),
    ("float dtype", 17, bytes([7]), 17, "dtype code 7 is not an integer token type"),
    ("unknown dtype", 17, bytes([99]), 17, "dtype code 99"),
    ("huge count", 18, struct.pack("<Q", 1 << 62), 18, "do not fit"),
    ("doc count", 26, struct.pack("<Q", N + 2), IDX_SIZE, "needs"),
    ("negative length", LENGTHS_AT + 4, struct.pack("<i", -1), LENGTHS_AT + 4, "negative length"),
    ("length past end", LENGTHS_AT + 8, struct.pack("<i", 50), LENGTHS_AT + 8, "past the end"),
    ("non-monotonic pointer", POINTERS_AT + 8, struct.pack("<q", 0), POINTERS_AT + 8,
     "monotonic and contiguous"),
    ("pointer out of range", POINTERS_AT + 16, struct.pack("<q", 10**9), POINTERS_AT + 16,
     "starts at .bin byte 1000000000"),
    ("doc index not from 0", DOC_IDX_AT, struct.pack("<q", 1), DOC_IDX_AT, "rise from 0"),
    ("doc index falls", DOC_IDX_AT + 16, struct.pack("<q", 0), DOC_IDX_AT + 16, "rise from 0"),
    ("doc index not to n", DOC_IDX_AT + 24, struct.pack("<q", 2), DOC_IDX_AT + 24, "rise from 0"),
])
def test_megatron_index_corruption(megatron, name, at, data, byte, pattern):
    bin_path, idx_path = megatron
    patch(idx_path, at, data)
    message = expect_error(bin_path, byte, pattern)
    assert str(idx_path) in message


def test_megatron_truncated_index(megatron):
    bin_path, idx_path = megatron
    idx_path.write_bytes(idx_path.read_bytes()[:20])
    expect_error(bin_path, 20, "truncated header")
    idx_path.write_bytes(b"")
    expect_error(bin_path, 0, "file is empty")


def test_megatron_index_truncated_mid_arrays(megatron):
    bin_path, idx_path = megatron
    idx_path.write_bytes(idx_path.read_bytes()[:IDX_SIZE - 5])
    expect_error(bin_path, IDX_SIZE - 5, f"has {IDX_SIZE - 5} bytes but its header")


def test_megatron_bin_truncated_and_extended(megatron):
    bin_path, idx_path = megatron
    good = bin_path.read_bytes()
    bin_path.write_bytes(good[:-3])
    message = expect_error(bin_path, LENGTHS_AT + 8, "past the end")
    assert str(bin_path) in message
    bin_path.write_bytes(good + b"\x00\x00")
    message = expect_error(bin_path, 12, "has 14 bytes but")
    assert message.startswith(str(bin_path))


def test_megatron_missing_and_empty_bin(megatron):
    bin_path, _ = megatron
    bin_path.write_bytes(b"")
    expect_error(bin_path, 0, "file is empty")
    bin_path.unlink()
    expect_error(bin_path, 0, "cannot open: No such file")


def test_token_id_out_of_vocab_names_the_token_and_byte(megatron):
    bin_path, _ = megatron
    patch(bin_path, 8, struct.pack("<H", 600))  # token 4 = document 2's first token
    message = expect_error(bin_path, 8, r"token id 600 \(token 4, document 2\) is outside the "
                                        r"vocabulary \[0, 512\)", vocab_size=512)
    assert message.startswith(str(bin_path))


def test_negative_token_id_in_signed_shard(tmp_path):
    bin_path, _ = write_megatron(tmp_path / "s", [[1, 2], [-7]], "int32")
    expect_error(bin_path, 8, r"token id -7", vocab_size=100)


@pytest.mark.parametrize("name,header,size_delta,byte,pattern", [
    ("magic", [1234, 1, 4], 0, 0, "wrong magic 1234"),
    ("version", [20240520, 3, 4], 0, 4, "unsupported version 3"),
    ("zero count", [20240520, 1, 0], 0, 8, "header says 0"),
    ("negative count", [20240520, 1, -4], 0, 8, "header says -4"),
    ("truncated body", [20240520, 1, 4], -3, 1024 + 5, "needs 1032 bytes, but the file has 1029"),
    ("trailing bytes", [20240520, 1, 4], 2, 1032, "but the file has 1034"),
])
def test_llmc_corruption(tmp_path, name, header, size_delta, byte, pattern):
    path = write_llmc(tmp_path / "fw_train_000001.bin", [50256, 1, 2, 3], magic=header[0],
                      version=header[1], count=header[2])
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) + size_delta] if size_delta < 0 else raw + bytes(size_delta))
    expect_error(path, byte, pattern, format="llmc")


def test_llmc_truncated_header(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(struct.pack("<3i", 20240520, 1, 4))
    expect_error(path, 12, "truncated header", format="llmc")


def test_headerless_partial_token_and_empty(tmp_path):
    path = write_headerless(tmp_path / "train.bin", [1, 2, 3], "uint32")
    path.write_bytes(path.read_bytes()[:-1])
    expect_error(path, 8, "not a whole number of uint32 tokens", format="headerless",
                 dtype="uint32", eos_id=0)
    path.write_bytes(b"")
    expect_error(path, 0, "file is empty", format="headerless", dtype="uint16", eos_id=0)


# ---- shard directories and their manifest --------------------------------------------------

@pytest.fixture
def shard_dir(tmp_path, tokenizer_dir):
    source = tmp_path / "in.txt"
    source.write_text("first document\nsecond one\nthird\n" * 5)
    out = tmp_path / "shards"
    prepare([source], out, tokenizer_dir, split_lines=True, shard_tokens=20, workers=1)
    return out


def test_missing_and_malformed_manifest(shard_dir):
    manifest = shard_dir / "manifest.json"
    good = manifest.read_text()
    manifest.write_text(good[:40])
    with pytest.raises(ShardFormatError, match="malformed manifest"):
        open_shards(shard_dir)
    raw = json.loads(good)
    raw["format_version"] = 99
    manifest.write_text(json.dumps(raw))
    with pytest.raises(ShardFormatError, match="format_version 99 is not supported"):
        open_shards(shard_dir)
    raw["format_version"] = 1
    raw["tokens"] += 1
    manifest.write_text(json.dumps(raw))
    with pytest.raises(ShardFormatError, match="do not add up"):
        open_shards(shard_dir)
    manifest.unlink()
    with pytest.raises(ShardFormatError, match="manifest.json: missing"):
        open_shards(shard_dir)


def test_shard_file_swapped_for_another(shard_dir):
    # Both files are valid on their own; only the manifest can tell they were exchanged.
    a, b = shard_dir / "part-00000", shard_dir / "part-00001"
    for suffix in (".bin", ".idx"):
        data_a, data_b = a.with_suffix(suffix).read_bytes(), b.with_suffix(suffix).read_bytes()
        a.with_suffix(suffix).write_bytes(data_b)
        b.with_suffix(suffix).write_bytes(data_a)
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    first, second = manifest["files"][0], manifest["files"][1]
    if (first["documents"], first["tokens"]) == (second["documents"], second["tokens"]):
        with pytest.raises(ShardFormatError, match="sha256"):
            verify(shard_dir)
    else:
        with pytest.raises(ShardFormatError, match="the manifest says"):
            open_shards(shard_dir)


def test_checksum_mismatch_found_by_verify_only(shard_dir):
    bin_path = shard_dir / "part-00000.bin"
    raw = bytearray(bin_path.read_bytes())
    raw[2] = (raw[2] + 1) % 200  # still a valid token id: structure and range checks pass
    bin_path.write_bytes(bytes(raw))
    open_shards(shard_dir)  # opening does not hash (it would read every byte)
    with pytest.raises(ShardFormatError, match=r"part-00000\.bin: sha256 .* does not match"):
        verify(shard_dir)


def test_out_of_vocab_token_in_directory(shard_dir):
    patch(shard_dir / "part-00000.bin", 2, struct.pack("<H", 65000))
    with pytest.raises(ShardFormatError, match=r"token id 65000 .* outside the vocabulary \[0, 300\)"):
        open_shards(shard_dir)
