"""Partitions of one build: disjoint row ranges of its source, each built by its own flow run
(possibly on another machine) into the same output, and the marker each one commits.

A partition is a range of whole source batches, so the batches, their content keys and the shards
they write are the ones a single-process build makes: N partitions write, name for name and byte
for byte, what one build writes. A finished partition commits `OUT/.partitions/<name>.json` last,
listing the tables and batch markers it wrote and its per-stage counts; the parent that finalises
the build trusts a partition only through that marker, only while every table it lists exists,
and only when it was written for the same content keys (`key`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from refany3d.storage.fs import url_to_fs
from refany3d.storage.shards import DATA_DIR, REJECTS_DIR
from refany3d.storage.store import join, write_atomic


class SourceBatch(Protocol):
    """What a partition needs of a source batch (`stages.read_source.SourceBatch`; named here by
    its shape, so that storage imports nothing of the stages above it)."""

    url: str
    start: int
    stop: int


PARTITIONS_DIR = ".partitions"


@dataclass(frozen=True)
class Partition:
    """Rows [start, stop) of the build's source, counted over its planned files in order."""

    index: int
    count: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"part-{self.index + 1:03d}-of-{self.count:03d}"

    def select(self, batches: Sequence[SourceBatch]) -> list[SourceBatch]:
        """The planned batches whose first row falls in this partition's range."""
        return [b for b, first in zip(batches, _offsets(batches)) if self.start <= first < self.stop]


def _offsets(batches: Sequence[SourceBatch]) -> list[int]:
    offsets, total = [], 0
    for b in batches:
        offsets.append(total)
        total += b.stop - b.start
    return offsets


def plan_partitions(batches: Sequence[SourceBatch], n: int) -> list[Partition]:
    """At most `n` partitions of whole batches, contiguous, their batch counts differing by <= 1."""
    if n < 1:
        raise ValueError(f"partitions: {n} is not a positive number")
    n = min(n, len(batches)) or 1
    offsets = _offsets(batches) + [sum(b.stop - b.start for b in batches)]
    cuts = [round(i * len(batches) / n) for i in range(n + 1)]
    return [Partition(i, n, offsets[cuts[i]], offsets[cuts[i + 1]]) for i in range(n)]


def partition_key(shard_keys: Sequence[str]) -> str:
    """What a partition's marker must have been written for: the content keys of its batches."""
    return hashlib.sha256("\n".join(shard_keys).encode()).hexdigest()[:32]


def write_partition_marker(out: str, partition: Partition, key: str, summary: dict[str, Any]) -> None:
    """Commit a finished partition (after its tables and batch markers). `summary`: `files`
    (table names), `markers` (batch marker names), `counts` and `reasons` (the report's), `gallery`
    (a few sample dicts)."""
    fs, root = url_to_fs(out)
    body = {"partition": asdict(partition), "key": key, **summary}
    write_atomic(fs, join(root, PARTITIONS_DIR, f"{partition.name}.json"), json.dumps(body).encode())


def read_partition_marker(out: str, partition: Partition, key: str) -> dict[str, Any] | None:
    """The marker of `partition`, when it was committed for content key `key`, covers this very
    row range, had no transient drops (those are tried again) and every table it lists is still
    there; else None (the partition must run)."""
    fs, root = url_to_fs(out)
    path = join(root, PARTITIONS_DIR, f"{partition.name}.json")
    if not fs.exists(path):
        return None
    body = json.loads(fs.cat_file(path))
    if body.get("key") != key or body.get("partition") != asdict(partition):
        return None
    if any(c.get("transient", 0) for c in body["counts"].values()):
        return None
    for name in body["files"]:
        if not fs.exists(join(root, DATA_DIR if name.startswith("shard-") else REJECTS_DIR, name)):
            return None
    return body
