import pyarrow as pa
import pyarrow.parquet as pq

from refany3d.config import BuildSettings
from refany3d.stages.context import StageContext
from refany3d.stages.read_source import MISSING_FIELD, iter_rows, plan_batches, read_source, resolve_files
from refany3d.storage.store import ArtifactStore
from tests.s200k import Row, write_subjects200k


def test_plan_batches_covers_rows_once_with_limit(tmp_path):
    write_subjects200k(tmp_path / "a.parquet", [Row(seed=i) for i in range(7)])
    write_subjects200k(tmp_path / "b.parquet", [Row(seed=i) for i in range(5)])
    files = resolve_files(str(tmp_path / "*.parquet"))
    batches = plan_batches(files, batch_size=3)
    assert [(b.start, b.stop) for b in batches] == [(0, 3), (3, 6), (6, 7), (0, 3), (3, 5)]
    limited = plan_batches(files, batch_size=3, limit=8)
    assert sum(b.stop - b.start for b in limited) == 8


def test_iter_rows_crosses_row_groups(tmp_path):
    write_subjects200k(
        tmp_path / "a.parquet", [Row(seed=i, item=f"item {i}") for i in range(8)], row_group_size=3
    )
    rows = list(iter_rows(str(tmp_path / "a.parquet"), 2, 7, ["description"]))
    assert [i for i, _ in rows] == [2, 3, 4, 5, 6]
    assert [r["description"]["item"] for _, r in rows] == [f"item {i}" for i in range(2, 7)]


def test_read_source_row_samples_point_back(tmp_path):
    write_subjects200k(tmp_path / "a.parquet", [Row(item="table lamp"), Row()])
    (batch,) = plan_batches([str(tmp_path / "a.parquet")], batch_size=8)
    result = read_source(batch, BuildSettings(), StageContext(store=ArtifactStore(str(tmp_path / "s"))))
    assert [s.sample_id for s in result.kept] == ["a-000000", "a-000001"]
    assert result.kept[0].item == "table lamp" and result.kept[0].source_ref.endswith("a.parquet#0")
    assert result.kept[0].quality["imageQuality"] == 5


def test_read_source_missing_field_rejected(tmp_path):
    table = pa.table({"image": [b"x"], "collection": ["c"]})
    pq.write_table(table, tmp_path / "bad.parquet")
    (batch,) = plan_batches([str(tmp_path / "bad.parquet")], batch_size=8)
    result = read_source(batch, BuildSettings(), StageContext(store=ArtifactStore(str(tmp_path / "s"))))
    assert not result.kept
    assert [(r.stage, r.reason, r.detail) for r in result.dropped] == [
        ("source", MISSING_FIELD, "quality_assessment")
    ]
