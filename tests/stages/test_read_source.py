import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refany3d.config import BuildSettings, override
from refany3d.stages.context import StageContext
from refany3d.stages.read_source import (
    BAD_FILE,
    MISSING_FIELD,
    SourceFileError,
    check_file,
    check_source,
    iter_rows,
    plan_batches,
    plan_source,
    read_source,
    resolve_files,
    scan_files,
)
from refany3d.storage.store import ArtifactStore
from tests.s200k import SCHEMA, Row, write_subjects200k


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
    row = {"image": {"bytes": b"x", "path": None}, "collection": "c", "quality_assessment": None}
    pq.write_table(pa.Table.from_pylist([row], schema=SCHEMA), tmp_path / "bad.parquet")
    (batch,) = plan_batches([str(tmp_path / "bad.parquet")], batch_size=8)
    result = read_source(batch, BuildSettings(), StageContext(store=ArtifactStore(str(tmp_path / "s"))))
    assert not result.kept
    assert [(r.stage, r.reason, r.detail) for r in result.dropped] == [
        ("source", MISSING_FIELD, "quality_assessment")
    ]


def test_read_source_reason_strings():
    assert (MISSING_FIELD, BAD_FILE) == ("missing_field", "bad_file")


def test_check_file_counts_rows_from_the_footer(tmp_path):
    write_subjects200k(tmp_path / "a.parquet", [Row(seed=i) for i in range(4)])
    assert check_file(str(tmp_path / "a.parquet")) == 4


def test_check_file_not_parquet_names_the_file(tmp_path):
    (tmp_path / "notes.parquet").write_text("just text")
    with pytest.raises(SourceFileError, match=r"notes\.parquet: not a Parquet file \(.*magic bytes"):
        check_file(str(tmp_path / "notes.parquet"))


def test_check_file_lacking_a_column_names_file_and_column(tmp_path):
    pq.write_table(pa.table({"image": [b"x"], "collection": ["c"]}), tmp_path / "thin.parquet")
    with pytest.raises(SourceFileError, match=r"thin\.parquet: no column 'quality_assessment'"):
        check_file(str(tmp_path / "thin.parquet"))


def test_check_file_column_of_the_wrong_shape_is_named(tmp_path):
    table = pa.table(
        {"image": [b"x"], "collection": ["c"], "quality_assessment": ["5,5,5"], "description": ["mug"]}
    )
    pq.write_table(table, tmp_path / "flat.parquet")
    with pytest.raises(SourceFileError, match=r"flat\.parquet: column 'quality_assessment' is string"):
        check_file(str(tmp_path / "flat.parquet"))


def _good_and_bad(tmp_path):
    write_subjects200k(tmp_path / "a.parquet", [Row(seed=i) for i in range(3)])
    (tmp_path / "b.parquet").write_bytes(b"PAR1 truncated")
    write_subjects200k(tmp_path / "c.parquet", [Row(seed=i) for i in range(2)])
    return resolve_files(str(tmp_path / "*.parquet"))


def test_scan_files_one_bad_file_stops_the_plan(tmp_path):
    with pytest.raises(SourceFileError, match=r"b\.parquet: not a Parquet file"):
        scan_files(_good_and_bad(tmp_path))


def test_scan_files_skip_bad_rejects_each_bad_file(tmp_path):
    files = _good_and_bad(tmp_path)
    planned, rejects = scan_files(files, limit=4, skip_bad=True)
    assert [(url.rsplit("/", 1)[1], rows) for url, rows in planned] == [("a.parquet", 3), ("c.parquet", 1)]
    assert [(r.sample_id, r.stage, r.reason) for r in rejects] == [("b", "source", BAD_FILE)]
    assert rejects[0].detail.startswith(f"{files[1]}: not a Parquet file")


def test_plan_source_skips_what_check_source_rejects(tmp_path):
    _good_and_bad(tmp_path)
    settings = override(
        BuildSettings(),
        **{
            "source.kind": "subjects200k",
            "source.data_files": str(tmp_path / "*.parquet"),
            "source.skip_bad_files": True,
        },
    )
    assert [r.reason for r in check_source(settings)] == [BAD_FILE]
    assert {b.url.rsplit("/", 1)[1] for b in plan_source(settings)} == {"a.parquet", "c.parquet"}
    with pytest.raises(SourceFileError):
        check_source(override(settings, **{"source.skip_bad_files": False}))
