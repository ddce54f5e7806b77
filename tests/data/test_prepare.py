"""`prepare` writes exactly the tokenizer's ids, deterministically and atomically."""

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from independent_writers import write_jsonl
from transformers import AutoTokenizer

from cptfast.cli import main as cli_main
from cptfast.data import open_shard, open_shards, prepare, verify
from cptfast.errors import ShardFormatError

UNICODE_DOCS = [
    "Zoë's café serves crème brûlée.",
    "東京タワーは高いです。",
    "🚀🔥👍🏽 ∑ᵢ xᵢ² ≤ ∞",
    "Ελληνικά, русский, العربية, עברית",
    "a",  # a tiny document: BOS, one token, EOS
    "line one\nline two\r\n\ttabbed",
]


def oracle_ids(tokenizer_dir, texts):
    """What each document must read back as: the tokenizer's own ids, then EOS."""
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    out = []
    for text in texts:
        ids = tok(text)["input_ids"]
        out.append(ids if ids and ids[-1] == tok.eos_token_id else ids + [tok.eos_token_id])
    return out


def read_all(directory):
    return [doc.tolist() for doc in open_shards(directory)]


def file_digests(directory):
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fixture", ["tokenizer_dir", "tokenizer_no_bos_dir"])
def test_read_back_equals_tokenizer_ids(tmp_path, request, fixture):
    tokenizer = request.getfixturevalue(fixture)
    rng = np.random.default_rng(1)
    huge = " ".join(UNICODE_DOCS[i % 4] for i in range(3000))  # one document of ~30k tokens
    tiny = [chr(ord("a") + int(k)) for k in rng.integers(0, 26, 700)]  # many one-letter docs
    jsonl_docs = UNICODE_DOCS + ["", "   \n", huge] + tiny
    write_jsonl(tmp_path / "a.jsonl", jsonl_docs)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        for text in UNICODE_DOCS[::-1]:
            f.write(json.dumps({"body": text}) + "\n")
    (tmp_path / "c.txt").write_text("whole file\nis one document ☕\n", encoding="utf-8")

    summary = prepare([tmp_path / "a.jsonl"], tmp_path / "out", tokenizer, workers=2)
    expected = oracle_ids(tokenizer, [d for d in jsonl_docs if d.strip()])
    assert read_all(tmp_path / "out") == expected
    assert summary.documents == len(expected) and summary.empty_documents_skipped == 2
    assert summary.tokens == sum(map(len, expected))
    assert max(map(len, expected)) > 20_000  # the huge document really is huge
    counts = np.bincount(np.log2([len(e) for e in expected]).astype(int))
    assert summary.length_histogram == counts.tolist()

    prepare([tmp_path / "b.jsonl.gz", tmp_path / "c.txt"], tmp_path / "out2", tokenizer,
            text_field="body", workers=1)
    expected2 = oracle_ids(tokenizer, UNICODE_DOCS[::-1] + ["whole file\nis one document ☕\n"])
    assert read_all(tmp_path / "out2") == expected2


def test_split_lines_and_directories_as_inputs(tmp_path, tokenizer_dir):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "b.txt").write_text("three\n\nfour\n")
    (corpus / "sub" / "a.txt").write_text("one\ntwo")
    (corpus / "ignored.csv").write_text("not read")
    summary = prepare([corpus], tmp_path / "out", tokenizer_dir, split_lines=True, workers=1)
    # Sorted paths: b.txt before sub/a.txt; the blank line is skipped and counted.
    assert read_all(tmp_path / "out") == oracle_ids(tokenizer_dir, ["three", "four", "one", "two"])
    assert summary.empty_documents_skipped == 1


def test_parquet_input(tmp_path, tokenizer_dir):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = UNICODE_DOCS + [None, ""]
    pq.write_table(pa.table({"content": texts, "n": list(range(len(texts)))}),
                   tmp_path / "x.parquet")
    summary = prepare([tmp_path / "x.parquet"], tmp_path / "out", tokenizer_dir,
                      text_field="content", workers=1)
    assert read_all(tmp_path / "out") == oracle_ids(tokenizer_dir, UNICODE_DOCS)
    assert summary.empty_documents_skipped == 2
    with pytest.raises(ValueError, match="no column 'text'"):
        prepare([tmp_path / "x.parquet"], tmp_path / "out3", tokenizer_dir, workers=1)


def test_identical_bytes_for_identical_inputs_any_worker_count(tmp_path, tokenizer_dir):
    docs = [f"document {i}: " + UNICODE_DOCS[i % len(UNICODE_DOCS)] * (i % 7 + 1)
            for i in range(1500)]
    write_jsonl(tmp_path / "in.jsonl", docs)
    runs = []
    for k, workers in enumerate([1, 2, 2]):
        out = tmp_path / f"out{k}"
        prepare([tmp_path / "in.jsonl"], out, tokenizer_dir, shard_tokens=10_000,
                workers=workers)
        runs.append(file_digests(out))
    assert runs[0] == runs[1] == runs[2]
    assert sum(name.endswith(".bin") for name in runs[0]) > 3


def test_shards_close_once_they_reach_shard_tokens(tmp_path, tokenizer_dir):
    docs = [("word " * (i % 13 + 1)).strip() for i in range(300)]
    write_jsonl(tmp_path / "in.jsonl", docs)
    prepare([tmp_path / "in.jsonl"], tmp_path / "out", tokenizer_dir, shard_tokens=500,
            workers=2)
    opened = open_shards(tmp_path / "out")
    sizes = [s.num_tokens for s in opened.shards]
    last_docs = [len(s.document(-1)) for s in opened.shards]
    assert all(size >= 500 for size in sizes[:-1]) and 0 < sizes[-1]
    # A file closes at the first document that takes it to 500 tokens, not later.
    assert all(size - last < 500 for size, last in zip(sizes[:-1], last_docs[:-1]))
    expected = oracle_ids(tokenizer_dir, docs)
    assert [d.tolist() for d in opened] == expected
    assert [opened.document(i).tolist() for i in range(len(opened))] == expected
    assert opened.document(-1).tolist() == expected[-1]
    with pytest.raises(IndexError):
        opened.document(len(expected))


def test_shard_boundary_exactly_at_shard_tokens(tmp_path, tokenizer_dir):
    # Equal documents of L tokens and shard_tokens = 5 L: every file holds exactly 5 of them.
    length = len(oracle_ids(tokenizer_dir, ["same text"])[0])
    write_jsonl(tmp_path / "in.jsonl", ["same text"] * 23)
    prepare([tmp_path / "in.jsonl"], tmp_path / "out", tokenizer_dir, shard_tokens=5 * length,
            workers=1)
    assert [len(s) for s in open_shards(tmp_path / "out").shards] == [5, 5, 5, 5, 3]


def test_manifest_records_the_facts(tmp_path, tokenizer_dir):
    write_jsonl(tmp_path / "in.jsonl", UNICODE_DOCS * 10)
    prepare([tmp_path / "in.jsonl"], tmp_path / "out", tokenizer_dir, shard_tokens=200, workers=1)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    expected = oracle_ids(tokenizer_dir, UNICODE_DOCS * 10)
    flat = [t for doc in expected for t in doc]
    assert manifest["format"] == "cptfast-shards" and manifest["format_version"] == 1
    assert manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["vocab_size"] == len(tok) == 300
    assert (manifest["tokenizer"]["bos_id"], manifest["tokenizer"]["eos_id"]) == \
        (tok.bos_token_id, tok.eos_token_id)
    assert manifest["tokenizer"]["path"] == str(Path(tokenizer_dir).absolute())
    assert (manifest["documents"], manifest["tokens"]) == (len(expected), len(flat))
    assert manifest["max_token_id"] == max(flat)
    for entry in manifest["files"]:
        for suffix in ("bin", "idx"):
            data = (tmp_path / "out" / f"{entry['name']}.{suffix}").read_bytes()
            assert entry[f"sha256_{suffix}"] == hashlib.sha256(data).hexdigest()
        shard = open_shard(tmp_path / "out" / f"{entry['name']}.bin")
        assert (entry["documents"], entry["tokens"]) == (shard.num_documents, shard.num_tokens)
    # The copied tokenizer loads and encodes like the original.
    copy = AutoTokenizer.from_pretrained(str(tmp_path / "out" / "tokenizer"))
    assert copy(UNICODE_DOCS[2])["input_ids"] == tok(UNICODE_DOCS[2])["input_ids"]


def test_large_vocabulary_uses_int32(tmp_path, big_vocab_tokenizer_dir):
    docs = ["w0 w69999 w65536", "w12345 nope w1"]
    write_jsonl(tmp_path / "in.jsonl", docs)
    prepare([tmp_path / "in.jsonl"], tmp_path / "out", big_vocab_tokenizer_dir, workers=1)
    opened = verify(tmp_path / "out")
    assert opened.manifest.dtype == "int32" and opened.shards[0].dtype == "int32"
    assert read_all(tmp_path / "out") == [[0, 69999, 65536, 70001], [12345, 70000, 1, 70001]]


def test_existing_output_needs_overwrite(tmp_path, tokenizer_dir):
    (tmp_path / "in.txt").write_text("hello")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare([tmp_path / "in.txt"], tmp_path / "out", tokenizer_dir, workers=1)
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
    prepare([tmp_path / "in.txt"], tmp_path / "out", tokenizer_dir, workers=1, overwrite=True)
    assert read_all(tmp_path / "out") == oracle_ids(tokenizer_dir, ["hello"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out"]


@pytest.mark.parametrize("content,field,pattern", [
    ('{"text": "ok"}\n{"text": oops}\n', "text", r"in\.jsonl:2: invalid JSON"),
    ('{"text": "ok"}\n{"body": "x"}\n', "text", r"in\.jsonl:2: no field 'text' \(found \['body'\]\)"),
    ('{"text": 5}\n', "text", r"in\.jsonl:1: field 'text' holds a int"),
    ('{"text": ""}\n{"text": "  "}\n', "text", "no non-empty documents"),
])
def test_bad_input_is_named_and_nothing_is_left_behind(tmp_path, tokenizer_dir, content, field,
                                                        pattern):
    (tmp_path / "in.jsonl").write_text(content)
    with pytest.raises(ValueError, match=pattern):
        prepare([tmp_path / "in.jsonl"], tmp_path / "out", tokenizer_dir, workers=2,
                text_field=field)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_invalid_utf8_and_unsupported_inputs(tmp_path, tokenizer_dir):
    (tmp_path / "bad.txt").write_bytes(b"fine \xff\xfe broken")
    with pytest.raises(ValueError, match=r"bad\.txt: not valid UTF-8 at byte 5"):
        prepare([tmp_path / "bad.txt"], tmp_path / "out", tokenizer_dir, workers=1)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported input type"):
        prepare([tmp_path / "x.csv"], tmp_path / "out", tokenizer_dir)
    with pytest.raises(FileNotFoundError, match="input file not found"):
        prepare([tmp_path / "missing.txt"], tmp_path / "out", tokenizer_dir)
    assert not (tmp_path / "out").exists()


def test_tokenizer_without_eos_is_refused(tmp_path, tokenizer_dir):
    from transformers import PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer)
    no_eos.save_pretrained(str(tmp_path / "tok"))
    (tmp_path / "in.txt").write_text("hello")
    with pytest.raises(ValueError, match="defines no eos_token"):
        prepare([tmp_path / "in.txt"], tmp_path / "out", tmp_path / "tok", workers=1)


def test_killed_prepare_leaves_nothing_that_looks_valid(tmp_path, tokenizer_dir):
    write_jsonl(tmp_path / "in.jsonl", [f"document number {i} " * 40 for i in range(40_000)])
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "cptfast", "prepare", "--tokenizer", str(tokenizer_dir),
         "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--workers", "1",
         "--shard-tokens", "20000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    staged = []
    while time.monotonic() < deadline and process.poll() is None:
        staged = [p for p in tmp_path.glob(".out.partial-*/part-00001.bin")]
        if staged:  # a first shard file is complete: the run is well under way
            break
        time.sleep(0.05)
    assert staged and process.poll() is None, "prepare finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*/manifest.json"))
    with pytest.raises(ShardFormatError, match="not a directory"):
        open_shards(out)
    with pytest.raises(ShardFormatError, match="manifest.json: missing"):
        open_shards(staged[0].parent)
    # The next run cleans up what the killed one left and publishes a complete directory.
    (tmp_path / "small.txt").write_text("after the crash")
    prepare([tmp_path / "small.txt"], out, tokenizer_dir, workers=1)
    assert read_all(out) == oracle_ids(tokenizer_dir, ["after the crash"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out", "small.txt"]


def test_cli_prepare_verify_and_errors(tmp_path, tokenizer_dir, capsys):
    (tmp_path / "in.txt").write_text("alpha\nbeta\n")
    args = ["prepare", "--tokenizer", str(tokenizer_dir), "--input", str(tmp_path / "in.txt"),
            "--output", str(tmp_path / "out"), "--split-lines", "--workers", "1"]
    assert cli_main(args) == 0
    assert "2 documents" in capsys.readouterr().out
    assert cli_main(["verify", str(tmp_path / "out")]) == 0
    assert "sha256 of every file verified" in capsys.readouterr().out
    assert cli_main(args) == 1
    assert "already exists" in capsys.readouterr().err
    bin_path = tmp_path / "out" / "part-00000.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-2])
    assert cli_main(["verify", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "cptfast verify: error:" in err and "part-00000" in err and "at byte" in err


def test_staging_of_a_live_run_is_left_alone(tmp_path, tokenizer_dir):
    import socket

    live = tmp_path / f".out.partial-{socket.gethostname()}-{os.getpid()}-abcd1234"
    live.mkdir()
    (tmp_path / "in.txt").write_text("x")
    prepare([tmp_path / "in.txt"], tmp_path / "out", tokenizer_dir, workers=1)
    assert live.is_dir()


@pytest.mark.parametrize("appends_eos", [False, True])
def test_cli_metadata_field_writes_loss_masks(tmp_path, tokenizer_dir, appends_eos):
    # `--metadata-field` (the MeCo name) is `--prefix-field`: the prefix is tokenized before the
    # text and its tokens are marked 0 in loss_mask/, the text's 1. A tokenizer that appends EOS
    # (T5-style) must not leave one between prefix and text.
    if appends_eos:
        from tokenizers import processors

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        bos, eos = tok.bos_token_id, tok.eos_token_id
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A <|eos|>", special_tokens=[("<|bos|>", bos), ("<|eos|>", eos)])
        tok.save_pretrained(str(tmp_path / "tokenizer"))
        tokenizer_dir = tmp_path / "tokenizer"
    (tmp_path / "in.jsonl").write_text('{"url": "example.org", "text": "alpha beta"}\n')
    args = ["prepare", "--tokenizer", str(tokenizer_dir), "--input", str(tmp_path / "in.jsonl"),
            "--output", str(tmp_path / "out"), "--metadata-field", "url",
            "--prefix-template", "{} ", "--workers", "1", "--no-progress"]
    assert cli_main(args) == 0
    [tokens] = read_all(tmp_path / "out")
    mask = open_shard(tmp_path / "out" / "loss_mask" / "part-00000.bin")[0].tolist()
    prefix = oracle_ids(tokenizer_dir, ["example.org "])[0][:-1]  # without its EOS
    eos = AutoTokenizer.from_pretrained(str(tokenizer_dir)).eos_token_id
    assert tokens[:len(prefix)] == prefix and len(mask) == len(tokens)
    assert mask == [0] * len(prefix) + [1] * (len(tokens) - len(prefix))
    assert tokens.count(eos) == 1 and tokens[-1] == eos
