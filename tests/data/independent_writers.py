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
