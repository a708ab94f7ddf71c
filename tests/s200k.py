"""Subjects200K-format Parquet files built in code for tests (real schema, several paddings)."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from refany3d.records import subjects200k_schema

SCHEMA = subjects200k_schema()


@dataclass
class Row:
    side: int = 64
    pad: int = 8
    scores: tuple[int, int, int] = (5, 5, 5)
    item: str = "ceramic mug"
    valid: bool = True
    corrupt: bool = False
    fmt: str = "PNG"
    captions: tuple[str, str] = ("a mug on a table", "a mug in a kitchen")
    seed: int = 0
    raw: bytes | None = None  # image bytes to store instead of the rendered pair (b"" = empty)
    views: list[np.ndarray] = field(default_factory=list)


def pair_image(row: Row) -> tuple[bytes, list[np.ndarray]]:
    """A padded pair whose two views are distinct random patterns; returns (bytes, [left, right])."""
    rng = np.random.default_rng(row.seed)
    s, p = row.side, row.pad
    canvas = np.full((s + 2 * p, 2 * s + 3 * p, 3), 255, np.uint8)
    views = [rng.integers(0, 255, (s, s, 3), dtype=np.uint8) for _ in range(2)]
    canvas[p : p + s, p : p + s] = views[0]
    canvas[p : p + s, 2 * p + s : 2 * p + 2 * s] = views[1]
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format=row.fmt)
    return buf.getvalue(), views


def write_subjects200k(path, rows: list[Row], row_group_size: int = 3) -> list[Row]:
    records = []
    for i, row in enumerate(rows):
        data, row.views = pair_image(row)
        if row.corrupt:
            data = b"\x89PNG\r\n\x1a\nnot really a png"
        if row.raw is not None:
            data = row.raw
        records.append(
            {
                "image": {"bytes": data, "path": None},
                "collection": f"collection_{1 + i % 2}",
                "quality_assessment": dict(
                    zip(("compositeStructure", "objectConsistency", "imageQuality"), row.scores)
                ),
                "description": {
                    "item": row.item,
                    "description_0": row.captions[0],
                    "description_1": row.captions[1],
                    "category": "Kitchenware",
                    "description_valid": row.valid,
                },
            }
        )
    pq.write_table(pa.Table.from_pylist(records, schema=SCHEMA), str(path), row_group_size=row_group_size)
    return rows


def _png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + b"".join(chunk(kind, body) for kind, body in chunks)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header says `width` x `height` RGB but whose pixel data is a few bytes: what a
    decompression bomb looks like to a reader of headers (decoding it would fail, or allocate
    width·height·3 bytes first)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return _png([(b"IHDR", ihdr), (b"IDAT", zlib.compress(b"\0" * 64)), (b"IEND", b"")])


def flat_png(width: int, height: int, rgb: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    """A real `width` x `height` RGB PNG of one colour: a few MB on disk however large, every
    pixel there to decode (each row after the first is filtered "up": all zeros)."""
    packer = zlib.compressobj(1)
    rows = [packer.compress(b"\0" + bytes(rgb) * width)]
    up = b"\2" + bytes(3 * width)
    rows += [packer.compress(up) for _ in range(height - 1)]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return _png([(b"IHDR", ihdr), (b"IDAT", b"".join(rows) + packer.flush()), (b"IEND", b"")])
