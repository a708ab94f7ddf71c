"""Shard stage: inline each sample's artifacts into Parquet rows and commit them as shards.

Columns are the ones the stages up to `settings.until` fill (`dag.shard_columns`), so a
`--until split` build writes Subjects200K view rows and a full build writes the whole schema.
"""

from __future__ import annotations

import json
from typing import Any

from refany3d.config import BuildSettings
from refany3d.models._truth import TRUTH_LABEL
from refany3d.records import (
    DEPTH,
    IMAGE,
    MASK,
    MESH,
    POINT_MAP,
    POINT_MAP_RAW,
    VIEWS_POINT_MAP,
    VIEWS_RGB,
    Sample,
    StageResult,
    image_cell,
)
from refany3d.stages.context import StageContext
from refany3d.stages.dag import shard_columns
from refany3d.storage.shards import content_name, write_shard
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
            row[col] = TRUTH_LABEL in sample.backends.values()
        elif col in ("metrics", "backends"):
            row[col] = json.dumps(getattr(sample, col), sort_keys=True)
        else:
            row[col] = getattr(sample, col)
    return row


def shard_names(kept: list[Sample], shard_size: int) -> list[str]:
    """File names of the shards that `shard` writes for these kept samples (sample-id order)."""
    ids = sorted(s.sample_id for s in kept)
    return [content_name("shard", ids[i : i + shard_size]) for i in range(0, len(ids), shard_size)]


def shard(samples: list[Sample], settings: BuildSettings, ctx: StageContext) -> StageResult:
    """Write `samples` as shards of `storage.shard_size`, in sample-id order, one shard in memory."""
    result = StageResult()
    columns = shard_columns(settings.until)
    rows: list[dict[str, Any]] = []
    for sample in sorted(samples, key=lambda s: s.sample_id):
        try:
            rows.append(sample_row(sample, columns, ctx.store))
        except FileNotFoundError as err:
            result.drop(sample, STAGE, ARTIFACT_MISSING, detail=str(err)[:200])
            continue
        result.kept.append(sample)
        if len(rows) == settings.storage.shard_size:
            write_shard(settings.storage.out, rows, columns)
            rows = []
    write_shard(settings.storage.out, rows, columns)
    return result
