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

import pyarrow as pa
import pyarrow.parquet as pq

from refany3d.config import BuildSettings, SettingsError
from refany3d.records import Rejection, Sample, StageResult, error_detail, subjects200k_schema
from refany3d.stages.context import StageContext
from refany3d.storage.fs import url_to_fs

STAGE = "source"
MISSING_FIELD = "missing_field"
BAD_FILE = "bad_file"  # a whole data file skipped (source.skip_bad_files); the file is in `detail`

_META_COLUMNS = ("collection", "quality_assessment", "description")
_STRUCT_COLUMNS = ("image", "quality_assessment", "description")  # the rest is read as text


class SourceFileError(SettingsError):
    """A data file is not a Subjects200K-format Parquet file; the message names the file and why."""


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
    def content_ref(self) -> str:
        """The batch as content keys name it: the source kind, the file's name (sample ids carry
        it) and the row range, not where the file lives (its content is the file fingerprint)."""
        return f"{self.source}:{_stem(self.url)}#{self.start}:{self.stop}"

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


def check_file(url: str) -> int:
    """Rows of one Subjects200K-format Parquet file, from its footer alone (no data pages read).

    Raises SourceFileError naming the file when it is missing, is not Parquet, or its schema lacks
    a Subjects200K column (or holds it in a shape the stages cannot read).
    """
    fs, path = url_to_fs(url)
    try:
        with fs.open(path, "rb") as fh:
            footer = pq.ParquetFile(fh)
            schema, rows = footer.schema_arrow, footer.metadata.num_rows
    except FileNotFoundError:
        raise SourceFileError(f"source.data_files: {url}: no such file") from None
    except pa.ArrowInvalid as err:  # pyarrow's word for "no Parquet footer here"
        raise SourceFileError(
            f"source.data_files: {url}: not a Parquet file ({error_detail(err, 300)})"
        ) from None
    except (pa.ArrowException, OSError) as err:  # permissions, network, a directory
        raise SourceFileError(
            f"source.data_files: {url}: cannot be read ({error_detail(err, 300)})"
        ) from None
    expected = subjects200k_schema()
    for name in expected.names:
        if name not in schema.names:
            raise SourceFileError(
                f"source.data_files: {url}: no column {name!r}; a Subjects200K file has "
                f"{', '.join(expected.names)}"
            )
    for name in _STRUCT_COLUMNS:
        kind = schema.field(name).type
        if not (pa.types.is_struct(kind) or (name == "image" and pa.types.is_binary(kind))):
            raise SourceFileError(
                f"source.data_files: {url}: column {name!r} is {kind}, expected {expected.field(name).type}"
            )
    return int(rows)


def scan_files(
    files: list[str], limit: int = 0, skip_bad: bool = False
) -> tuple[list[tuple[str, int]], list[Rejection]]:
    """(url, rows to read) of the files a build reads, until `limit` rows (0 = all), each file's
    footer checked by `check_file`; and the `bad_file` rejects of the files skipped.

    A bad file raises SourceFileError, unless `skip_bad`: then it is skipped and rejected (its
    rows are never planned, and do not count toward `limit`).
    """
    planned: list[tuple[str, int]] = []
    rejects: list[Rejection] = []
    remaining = limit or float("inf")
    for url in files:
        try:
            rows = check_file(url)
        except SourceFileError as err:
            if not skip_bad:
                raise
            stem = posixpath.basename(url).removesuffix(".parquet")
            detail = str(err).removeprefix("source.data_files: ")
            rejects.append(Rejection(stem, stem, STAGE, BAD_FILE, None, detail))
            continue
        rows = int(min(rows, remaining))
        remaining -= rows
        planned.append((url, rows))
        if remaining <= 0:
            break
    return planned, rejects


def plan_batches(
    files: list[str],
    batch_size: int,
    limit: int = 0,
    source: str = "subjects200k",
    skip_bad: bool = False,
) -> list[SourceBatch]:
    """Split files into row ranges of `batch_size`, reading only Parquet footers (see `scan_files`)."""
    planned, _ = scan_files(files, limit, skip_bad)
    return [
        SourceBatch(url, s, min(s + batch_size, rows), source)
        for url, rows in planned
        for s in range(0, rows, batch_size)
    ]


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
    """Batches of the build's source, `source.limit` rows at most (bad files skipped when
    `source.skip_bad_files`; `check_source` gives their rejects)."""
    return plan_batches(
        source_files(settings),
        settings.runtime.batch_size,
        settings.source.limit,
        settings.source.kind,
        settings.source.skip_bad_files,
    )


def check_source(settings: BuildSettings) -> list[Rejection]:
    """Read the footer of every data file the build will read, before any work: SourceFileError
    for a bad one, or with `source.skip_bad_files` its `bad_file` reject (one per file).

    The synthetic source without `data_files` is written by the build itself (into OUT/source), so
    there is nothing to check before it runs.
    """
    if settings.source.kind == "synthetic" and not settings.source.data_files:
        return []
    try:
        files = source_files(settings)
    except (SettingsError, FileNotFoundError):
        raise
    except Exception as err:  # noqa: BLE001 - listing a remote source fails in many ways (offline, auth, bad id)
        setting = "source.data_files" if settings.source.data_files else "source.hub_id"
        raise SourceFileError(f"{setting}: cannot list the source files ({error_detail(err, 300)})") from None
    _, rejects = scan_files(files, settings.source.limit, settings.source.skip_bad_files)
    return rejects
