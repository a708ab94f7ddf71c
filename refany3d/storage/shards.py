"""Idempotent, atomic Parquet shard and reject-table writers, and a shard reader.

A shard's name is derived from the sorted sample ids it holds, so writing the same samples again
names the same file and is skipped: a rerun never duplicates a sample. Each file is committed by
an atomic rename, so a crash mid-write leaves no partial shard visible.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from refany3d.records import Rejection, reject_schema, shard_schema
from refany3d.storage.store import join, write_atomic

DATA_DIR = "data"
REJECTS_DIR = "rejects"


def content_name(prefix: str, ids: Iterable[str]) -> str:
    digest = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:20]
    return f"{prefix}-{digest}.parquet"


def _write_table(out: str, subdir: str, name: str, table: pa.Table) -> str:
    fs, root = url_to_fs(out)
    path = join(root, subdir, name)
    if not fs.exists(path):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        write_atomic(fs, path, sink.getvalue().to_pybytes())
    return join(out, subdir, name)


def write_shard(out: str, rows: Sequence[dict[str, Any]], columns: list[str]) -> str | None:
    """Write `rows` (dicts keyed by column) as one shard under `out/data/`; returns its URL.

    Skips the write when a shard with the same sample ids exists. Returns None for no rows.
    """
    if not rows:
        return None
    schema = shard_schema(columns)
    table = pa.Table.from_pylist([{c: r.get(c) for c in schema.names} for r in rows], schema=schema)
    return _write_table(out, DATA_DIR, content_name("shard", (r["sample_id"] for r in rows)), table)


def rejects_name(rejections: Sequence[Rejection]) -> str:
    return content_name("rejects", (f"{r.stage}/{r.sample_id}" for r in rejections))


def write_rejects(out: str, rejections: Sequence[Rejection]) -> str | None:
    """Write one reject table under `out/rejects/`, named by its (stage, sample id) pairs."""
    if not rejections:
        return None
    schema = reject_schema()
    rows = [{name: getattr(r, name) for name in schema.names} for r in rejections]
    table = pa.Table.from_pylist(rows, schema=schema)
    return _write_table(out, REJECTS_DIR, rejects_name(rejections), table)


def prune_tables(out: str, subdir: str, keep: set[str]) -> list[str]:
    """Remove the tables under `out/subdir` whose file name is not in `keep` (an earlier build's
    leftovers, e.g. shards of another `--until`); returns the removed URLs."""
    stale = [p for p in list_tables(out, subdir) if posixpath.basename(p) not in keep]
    if stale:
        fs, _ = url_to_fs(out)
        for path in stale:
            fs.rm(url_to_fs(path)[1])
    return stale


def list_tables(out: str, subdir: str = DATA_DIR) -> list[str]:
    fs, root = url_to_fs(out)
    base = join(root, subdir)
    if not fs.exists(base):
        return []
    names = sorted(p for p in fs.ls(base, detail=False) if p.endswith(".parquet") and "/.tmp-" not in p)
    protocol = out.split("://")[0] + "://" if "://" in out else ""
    return [protocol + p if protocol and not p.startswith(protocol) else p for p in names]


def read_rows(paths: Iterable[str], columns: list[str] | None = None, batch_rows: int = 64) -> Iterator[dict]:
    """Stream rows of Parquet files (any fsspec URL) as dicts, one record batch at a time."""
    for path in paths:
        fs, p = url_to_fs(path)
        with fs.open(p, "rb") as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=batch_rows, columns=columns):
                yield from batch.to_pylist()
