"""Shard stage: inline each sample's artifacts into Parquet rows and commit them as shards.

Columns are the ones the stages up to `settings.until` fill (`dag.shard_columns`), so a
`--until split` build writes Subjects200K view rows and a full build writes the whole schema.
Shard names carry the stage's content key (`ctx.key`), so they change whenever anything that
decides their bytes does. A sample whose row cannot be built is dropped alone; the stage never
falls back to writing one-sample shards, and it reports the files it wrote.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from refany3d.config import BuildSettings
from refany3d.models import _truth
from refany3d.records import (
    DEPTH,
    IMAGE,
    MASK,
    MESH,
    POINT_MAP,
    POINT_MAP_RAW,
    STAGE_ERROR,
    VIEWS_POINT_MAP,
    VIEWS_RGB,
    Sample,
    StageResult,
    error_detail,
    image_cell,
    is_out_of_memory,
    is_transient,
    shard_schema,
)
from refany3d.stages.context import StageContext
from refany3d.stages.dag import shard_columns
from refany3d.storage.shards import write_shard
from refany3d.storage.store import ArtifactStore

STAGE = "shard"
ARTIFACT_MISSING = "artifact_missing"

_IMAGE_COLUMNS = {"image": IMAGE, "mask": MASK, "point_map": POINT_MAP}
_BYTES_COLUMNS = {"depth": DEPTH, "mesh_glb": MESH, "point_map_raw": POINT_MAP_RAW}
_VIEW_COLUMNS = {"views_rgb": VIEWS_RGB, "views_point_map": VIEWS_POINT_MAP}
_METRIC_COLUMNS = ("mask_iou", "lpips")  # verification metrics, kept on the record


def sample_row(sample: Sample, columns: list[str], store: ArtifactStore) -> dict[str, Any]:
    """One shard row: small fields copied, artifact URIs replaced by their bytes."""
    row: dict[str, Any] = {}
    for col in columns:
        if col in _IMAGE_COLUMNS:
            uri = sample.artifacts.get(_IMAGE_COLUMNS[col])
            row[col] = image_cell(store.get(uri)) if uri else None
        elif col in _BYTES_COLUMNS:
            uri = sample.artifacts.get(_BYTES_COLUMNS[col])
            row[col] = store.get(uri) if uri else None
        elif col in _VIEW_COLUMNS:
            uris = json.loads(sample.artifacts.get(_VIEW_COLUMNS[col], "[]"))
            row[col] = [image_cell(store.get(u)) for u in uris] if uris else None
        elif col in _METRIC_COLUMNS:
            row[col] = sample.metrics.get(col)
        elif col == "truth":
            row[col] = _truth.TRUTH_LABEL in sample.backends.values()
        elif col in ("metrics", "backends"):
            row[col] = json.dumps(getattr(sample, col), sort_keys=True)
        else:
            row[col] = getattr(sample, col)
    return row


def _checked_row(sample: Sample, columns: list[str], schema: pa.Schema, store: ArtifactStore) -> dict:
    """The sample's row, converted once on its own so that a value the schema refuses is this
    sample's error, not the whole shard's."""
    row = sample_row(sample, columns, store)
    pa.Table.from_pylist([{c: row.get(c) for c in schema.names}], schema=schema)
    return row


def shard(samples: list[Sample], settings: BuildSettings, ctx: StageContext) -> StageResult:
    """Write `samples` as shards of `storage.shard_size`, in sample-id order, one shard in memory."""
    result = StageResult()
    columns = shard_columns(settings.until)
    schema = shard_schema(columns)
    rows: list[dict[str, Any]] = []

    def commit() -> None:
        name = write_shard(settings.storage.out, ctx.key, rows, columns)
        if name:
            result.files.append(name)
        rows.clear()

    for sample in sorted(samples, key=lambda s: s.sample_id):
        try:
            rows.append(_checked_row(sample, columns, schema, ctx.store))
        except FileNotFoundError as err:
            result.drop(sample, STAGE, ARTIFACT_MISSING, detail=str(err)[:200])
            continue
        except Exception as err:  # one bad sample must not cost the shard (or the build) the others
            transient = is_transient(err) or is_out_of_memory(err)
            result.drop(sample, STAGE, STAGE_ERROR, detail=error_detail(err, 500), transient=transient)
            continue
        result.kept.append(sample)
        if len(rows) == settings.storage.shard_size:
            commit()
    commit()
    return result
