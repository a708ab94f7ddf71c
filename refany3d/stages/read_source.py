"""Source stage: stream Subjects200K-format rows from Parquet files (local glob or any fsspec URL,
`hf://datasets/...` included) without holding the dataset in memory.

The unit of work is a `SourceBatch`, a row range of one file. Rows become row-level samples that
point back at their row (`source_ref = "<file>#<row>"`); the image bytes stay in the file until
`split` reads them.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from refany3d.config import BuildSettings
from refany3d.records import Sample, StageResult
from refany3d.stages.context import StageContext

STAGE = "source"
MISSING_FIELD = "missing_field"

_META_COLUMNS = ("collection", "quality_assessment", "description")


@dataclass(frozen=True)
class SourceBatch:
    """Rows [start, stop) of one Parquet file."""

    url: str
    start: int
    stop: int
    source: str = "subjects200k"

    @property
    def batch_id(self) -> str:
        return f"{_stem(self.url)}-{self.start:07d}-{self.stop:07d}"

    @property
    def batch_ref(self) -> str:
        """The file and row range, as content keys name the batch."""
        return f"{self.url}#{self.start}:{self.stop}"

    def row_sample(self, row: int) -> Sample:
        """The row-level sample of row `row` of this batch's file, before its fields are read."""
        sid = f"{_stem(self.url)}-{row:06d}"
        return Sample(sample_id=sid, source_id=sid, source=self.source, source_ref=f"{self.url}#{row}")

    def rows(self) -> list[SourceBatch]:
        """One single-row batch per row (a failing batch is retried row by row)."""
        return [SourceBatch(self.url, r, r + 1, self.source) for r in range(self.start, self.stop)]


def _stem(url: str) -> str:
    return posixpath.basename(url).removesuffix(".parquet")


def resolve_files(pattern: str) -> list[str]:
    """Expand a glob / URL (comma-separated for several) into sorted file URLs."""
    urls: list[str] = []
    for part in filter(None, (p.strip() for p in pattern.split(","))):
        fs, path = url_to_fs(part)
        matches = sorted(fs.glob(path)) if any(ch in path for ch in "*?[") else [path]
        protocol = part.split("://")[0] + "://" if "://" in part else ""
        urls += [protocol + m if protocol else m for m in matches if m.endswith(".parquet") or m == path]
    if not urls:
        raise FileNotFoundError(f"source.data_files: no Parquet files match {pattern!r}")
    return urls


def plan_batches(
    files: list[str], batch_size: int, limit: int = 0, source: str = "subjects200k"
) -> list[SourceBatch]:
    """Split files into row ranges of `batch_size`, reading only Parquet footers."""
    batches: list[SourceBatch] = []
    remaining = limit or float("inf")
    for url in files:
        fs, path = url_to_fs(url)
        with fs.open(path, "rb") as fh:
            rows = pq.ParquetFile(fh).metadata.num_rows
        rows = int(min(rows, remaining))
        remaining -= rows
        batches += [
            SourceBatch(url, s, min(s + batch_size, rows), source) for s in range(0, rows, batch_size)
        ]
        if remaining <= 0:
            break
    return batches


def iter_rows(url: str, start: int, stop: int, columns: list[str] | None) -> Iterator[tuple[int, dict]]:
    """(row index, row dict) for rows [start, stop) of `url`, reading only the row groups needed."""
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        names = set(pf.schema_arrow.names)
        cols = None if columns is None else [c for c in columns if c in names]
        first = 0
        for group in range(pf.num_row_groups):
            n = pf.metadata.row_group(group).num_rows
            lo, hi = max(start, first), min(stop, first + n)
            if lo < hi:
                table = pf.read_row_group(group, columns=cols).slice(lo - first, hi - lo)
                for offset, row in enumerate(table.to_pylist()):
                    yield lo + offset, row
            first += n
            if first >= stop:
                break


def read_source(batch: SourceBatch, settings: BuildSettings, ctx: StageContext) -> StageResult:
    """Row-level samples of one batch, with quality scores and descriptions (no image bytes)."""
    result = StageResult()
    for index, row in iter_rows(batch.url, batch.start, batch.stop, list(_META_COLUMNS)):
        sample = batch.row_sample(index)
        sample.collection = str(row.get("collection") or "")
        quality, description = row.get("quality_assessment"), row.get("description")
        if not isinstance(quality, dict) or not isinstance(description, dict):
            missing = "quality_assessment" if not isinstance(quality, dict) else "description"
            result.drop(sample, STAGE, MISSING_FIELD, detail=missing)
            continue
        sample.quality = {k: v for k, v in quality.items()}
        sample.description = dict(description)
        sample.item = str(description.get("item") or "").strip()
        sample.category = str(description.get("category") or "").strip()
        result.kept.append(sample)
    return result


def source_files(settings: BuildSettings) -> list[str]:
    """The Parquet files a build reads: `data_files`, else the synthetic source generated under
    OUT/source (synthetic), else the Hugging Face dataset's Parquet files over `hf://`."""
    if settings.source.data_files:
        return resolve_files(settings.source.data_files)
    if settings.source.kind == "synthetic":
        from refany3d.synthetic import ensure_synthetic  # late: pulls in the renderer

        root = posixpath.join(settings.storage.out.rstrip("/"), "source")
        return resolve_files(ensure_synthetic(root, settings.source.synthetic_rows, settings.source.seed))
    return resolve_files(f"hf://datasets/{settings.source.hub_id}/**/*.parquet")


def plan_source(settings: BuildSettings) -> list[SourceBatch]:
    """Batches of the build's source, `source.limit` rows at most."""
    return plan_batches(
        source_files(settings), settings.runtime.batch_size, settings.source.limit, settings.source.kind
    )
