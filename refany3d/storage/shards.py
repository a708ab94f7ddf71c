"""Idempotent, atomic Parquet shard and reject-table writers, completion markers, a shard reader.

A table's name is a hash of everything that decides its content: the content key of the stage
that writes it (which chains every setting, source file and line of code upstream, see
`stages/keys.py`) and the sample ids it holds. So the same build writes the same names, a file
that exists under its name is complete and current (it is committed by an atomic rename), and a
table written under other settings, another `--until` or other code has another name: it is never
mistaken for this build's output, and the build prunes it at the end.

A marker (`OUT/.markers/<key>.json`, written after its tables) lists the tables one shard task
committed; the task counts as done only while the marker and every table it lists exist.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from refany3d.records import Rejection, reject_schema, shard_schema
from refany3d.storage.fs import url_to_fs
from refany3d.storage.store import join, write_atomic

DATA_DIR = "data"
REJECTS_DIR = "rejects"
MARKERS_DIR = ".markers"
_PREFIXES = {DATA_DIR: "shard-", REJECTS_DIR: "rejects-"}


def table_name(prefix: str, key: str, ids: Iterable[str]) -> str:
    """`<prefix>-<hash of key and sorted ids>.parquet`."""
    digest = hashlib.sha256("\n".join([key, *sorted(ids)]).encode()).hexdigest()[:20]
    return f"{prefix}-{digest}.parquet"


def _write_table(out: str, subdir: str, name: str, table: pa.Table) -> str:
    fs, root = url_to_fs(out)
    path = join(root, subdir, name)
    if not fs.exists(path):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        write_atomic(fs, path, sink.getvalue().to_pybytes())
    return name


def write_shard(out: str, key: str, rows: Sequence[dict[str, Any]], columns: list[str]) -> str | None:
    """Write `rows` (dicts keyed by column) as one shard under `out/data/`; returns its file name.

    `key` is the writing stage's content key. Skips the write when the file exists. None for no rows.
    """
    if not rows:
        return None
    schema = shard_schema(columns)
    table = pa.Table.from_pylist([{c: r.get(c) for c in schema.names} for r in rows], schema=schema)
    return _write_table(out, DATA_DIR, table_name("shard", key, (r["sample_id"] for r in rows)), table)


def write_rejects(out: str, key: str, rejections: Sequence[Rejection]) -> str | None:
    """Write one reject table under `out/rejects/`; returns its file name (None for no rejects)."""
    if not rejections:
        return None
    schema = reject_schema()
    rows = [{name: getattr(r, name) for name in schema.names} for r in rejections]
    table = pa.Table.from_pylist(rows, schema=schema)
    name = table_name("rejects", key, (f"{r.stage}/{r.sample_id}" for r in rejections))
    return _write_table(out, REJECTS_DIR, name, table)


def write_marker(out: str, key: str, files: list[str]) -> None:
    """Record that the task of content key `key` committed `files` (call after writing them)."""
    fs, root = url_to_fs(out)
    write_atomic(fs, join(root, MARKERS_DIR, f"{key}.json"), json.dumps(sorted(files)).encode())


def marker_complete(out: str, key: str) -> bool:
    """True when the marker of `key` exists and every table it lists is still there."""
    fs, root = url_to_fs(out)
    path = join(root, MARKERS_DIR, f"{key}.json")
    if not fs.exists(path):
        return False
    files = json.loads(fs.cat_file(path))
    return all(fs.exists(join(root, _subdir(name), name)) for name in files)


def _subdir(name: str) -> str:
    return DATA_DIR if name.startswith(_PREFIXES[DATA_DIR]) else REJECTS_DIR


def prune_outputs(out: str, keep: set[str], markers: set[str]) -> list[str]:
    """Remove the shard and reject tables under `out` that this build did not write (an earlier
    build's, e.g. of another `--until`), and markers of other keys; returns the removed tables."""
    removed = []
    for subdir in (DATA_DIR, REJECTS_DIR):
        stale = [p for p in list_tables(out, subdir) if posixpath.basename(p) not in keep]
        removed += _remove(out, [p for p in stale if posixpath.basename(p).startswith(_PREFIXES[subdir])])
    fs, root = url_to_fs(out)
    base = join(root, MARKERS_DIR)
    if fs.exists(base):
        _remove(out, [p for p in fs.ls(base, detail=False) if posixpath.basename(p) not in markers])
    return removed


def _remove(out: str, paths: list[str]) -> list[str]:
    fs, _ = url_to_fs(out)
    for path in paths:
        fs.rm(url_to_fs(path)[1])
    return paths


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
