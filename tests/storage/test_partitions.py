"""Partitions: whole batches, disjoint, covering the source; a marker trusted only for its keys,
its row range, no transient drops and every table it lists."""

from __future__ import annotations

import pytest

from refany3d.stages.read_source import SourceBatch
from refany3d.storage.partitions import (
    Partition,
    partition_key,
    plan_partitions,
    read_partition_marker,
    write_partition_marker,
)
from refany3d.storage.shards import write_shard

COLUMNS = ["sample_id", "source", "source_id", "side", "caption"]


def _batches() -> list[SourceBatch]:
    """Two files of 7 and 4 rows in batches of 3: ranges 0-3, 3-6, 6-7 | 0-3, 3-4."""
    return [
        SourceBatch(f"/d/{f}.parquet", s, min(s + 3, n))
        for f, n in (("a", 7), ("b", 4))
        for s in range(0, n, 3)
    ]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 9])
def test_plan_partitions_splits_whole_batches_disjointly_and_covers_them_all(n):
    batches = _batches()
    parts = plan_partitions(batches, n)
    assert len(parts) == min(n, len(batches))
    chosen = [b for p in parts for b in p.select(batches)]
    assert chosen == batches  # each batch once, in order
    sizes = [len(p.select(batches)) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and all(sizes)
    assert [p.start for p in parts][0] == 0 and parts[-1].stop == 11
    assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))


def test_plan_partitions_refuses_zero():
    with pytest.raises(ValueError, match="not a positive number"):
        plan_partitions(_batches(), 0)


def test_partition_marker_is_trusted_only_for_its_keys_range_and_files(tmp_path):
    out = str(tmp_path)
    part = Partition(0, 2, 0, 6)
    name = write_shard(
        out, "k", [{"sample_id": "x", "source": "s", "source_id": "x", "side": "", "caption": ""}], COLUMNS
    )
    counts = {"shard": {"batches": 1, "in": 1, "kept": 1, "dropped": 0, "transient": 0}}
    summary = {"files": [name], "markers": ["k.json"], "counts": counts, "reasons": {}, "gallery": []}
    key = partition_key(["k"])
    write_partition_marker(out, part, key, summary)
    assert read_partition_marker(out, part, key)["files"] == [name]
    assert read_partition_marker(out, part, partition_key(["other"])) is None  # other settings or code
    assert read_partition_marker(out, Partition(0, 3, 0, 4), key) is None  # another split of the source
    (tmp_path / "data" / name).unlink()
    assert read_partition_marker(out, part, key) is None  # a table it lists is gone


def test_partition_marker_with_transient_drops_is_not_trusted(tmp_path):
    part = Partition(1, 2, 6, 11)
    counts = {"mesh": {"batches": 1, "in": 2, "kept": 1, "dropped": 1, "transient": 1}}
    write_partition_marker(
        str(tmp_path), part, "k", {"files": [], "markers": [], "counts": counts, "reasons": {}, "gallery": []}
    )
    assert read_partition_marker(str(tmp_path), part, "k") is None  # the next run tries them again
