"""Small writers of every shard format, written from the format descriptions with `struct`,
independently of cptfast's own writer, so that reading their files back is a real test."""

import json
import struct
from pathlib import Path

DTYPE_CODE = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "uint16": 8}
STRUCT_CHAR = {"uint8": "B", "int8": "b", "int16": "h", "int32": "i", "int64": "q",
               "uint16": "H", "uint32": "I"}


def pack_tokens(tokens, dtype: str) -> bytes:
    return struct.pack(f"<{len(tokens)}{STRUCT_CHAR[dtype]}", *tokens)


def write_megatron(prefix: Path, sequences, dtype: str = "uint16", document_starts=None,
                   modes: bool = False) -> tuple[Path, Path]:
    """Write ``prefix.bin``/``prefix.idx``. ``document_starts``: sequence index where each
    document starts (default: one document per sequence); ``modes`` appends multimodal bytes."""
    itemsize = struct.calcsize(STRUCT_CHAR[dtype])
    n = len(sequences)
    starts = list(range(n)) if document_starts is None else list(document_starts)
    doc_idx = starts + [n]
    lengths, pointers, position = [], [], 0
    for seq in sequences:
        lengths.append(len(seq))
        pointers.append(position)
        position += len(seq) * itemsize
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", DTYPE_CODE[dtype])
    idx += struct.pack("<QQ", n, len(doc_idx))
    idx += struct.pack(f"<{n}i", *lengths) + struct.pack(f"<{n}q", *pointers)
    idx += struct.pack(f"<{len(doc_idx)}q", *doc_idx)
    if modes:
        idx += bytes(n)
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    bin_path.write_bytes(b"".join(pack_tokens(s, dtype) for s in sequences))
    idx_path.write_bytes(idx)
    return bin_path, idx_path


def write_llmc(path: Path, tokens, *, magic: int = 20240520, version: int = 1,
               count: int | None = None) -> Path:
    header = [magic, version, len(tokens) if count is None else count] + [0] * 253
    dtype = "uint16" if version == 1 else "uint32"
    path.write_bytes(struct.pack("<256i", *header) + pack_tokens(tokens, dtype))
    return path


def write_headerless(path: Path, tokens, dtype: str = "uint16") -> Path:
    path.write_bytes(pack_tokens(tokens, dtype))
    return path


def write_jsonl(path: Path, texts, field: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({field: text}, ensure_ascii=False) + "\n")
    return path


def write_llmc_shards(directory: Path, documents, shard_tokens: int, *, eot: int = 50256,
                      name: str = "fineweb", magic: int = 20240520, version: int = 1) -> list:
    """What llm.c's `dev/data/fineweb.py` does: every document becomes [eot] + tokens, the
    stream fills shards of ``shard_tokens`` tokens, a document that does not fit is cut and
    continues in the next shard, and the last shard holds the rest. Shard 0 is validation in
    llm.c; here every shard is ``{name}_train_{k:06d}.bin``."""
    stream = [t for doc in documents for t in [eot] + list(doc)]
    paths = []
    for k, start in enumerate(range(0, len(stream), shard_tokens)):
        path = Path(directory) / f"{name}_train_{k:06d}.bin"
        write_llmc(path, stream[start:start + shard_tokens], magic=magic, version=version)
        paths.append(path)
    return paths


def write_datatrove(path: Path, documents, dtype: str = "uint16", metadata: bool = True) -> Path:
    """datatrove's tokenized output: ``path`` (.ds) holds the tokens, ``path.index`` the
    uint64 end position (in tokens) of every document, ``path.metadata`` the tokenizer name
    and token size."""
    path = Path(path)
    path.write_bytes(b"".join(pack_tokens(doc, dtype) for doc in documents))
    ends, total = [], 0
    for doc in documents:
        total += len(doc)
        ends.append(total)
    Path(f"{path}.index").write_bytes(struct.pack(f"<{len(ends)}Q", *ends))
    if metadata:
        size = struct.calcsize(STRUCT_CHAR[dtype])
        Path(f"{path}.metadata").write_text(f"gpt2|{size}\n{total}\n")
    return path
