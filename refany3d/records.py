"""The `Sample` record that moves between stages, and the Arrow schema of the final shards.

This module is the single source of truth for what a sample carries and what a shard holds.
Between stages a sample carries small values and URIs into the artifact store (`artifacts`),
never big arrays; the shard writer inlines the bytes at the end.

Shard schema version history (columns documented in docs/shard-schema.md):
    1 — first release: Subjects200K fields, mask, depth, pose, intrinsics, mesh, point maps, orbit views.
    2 — the final training row: adds `truth`, `mesh_scale`, `view_azimuths_deg`, `mask_iou`,
        `lpips`; `point_map_raw` is an npz of camera-frame XYZ in metres (was a 16-bit PNG).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import re
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

SHARD_SCHEMA_VERSION = 2

# Artifact roles a sample may reference (keys of `Sample.artifacts`).
IMAGE = "image"  # PNG of the S×S view
MASK = "mask"  # PNG, 8-bit, 255 = object
DEPTH = "depth"  # npz, float16 metres, key "depth"
MESH = "mesh"  # GLB of the object in its canonical frame
POINT_MAP = "point_map"  # PNG, 8-bit: scene point map in canonical coordinates, white background
POINT_MAP_RAW = "point_map_raw"  # npz, key "xyz": (H, W, 3) float32 camera-frame metres, 0 = off the object
OVERLAY = "overlay"  # PNG: the scene point map blended over the view where the posed mesh is
VIEWS_RGB = "views_rgb"  # JSON list of PNG URIs, one per orbit view
VIEWS_POINT_MAP = "views_point_map"  # JSON list of PNG URIs, one per orbit view
TURNTABLE = "turntable"  # mp4: orbit RGB | point map side by side (render.turntable only)
TRUTH = "truth"  # npz of the synthetic ground truth of this view (synthetic source only)


@dataclass
class Sample:
    """One subject view on its way through the build.

    Before `split`, a sample stands for a whole Subjects200K row (`side == ""`); after it, for
    one of the row's two views. `source_ref` points at the row in its Parquet file
    (`<url>#<row index>`), so the image bytes are read only where they are needed.
    """

    sample_id: str
    source_id: str
    source: str  # "subjects200k" | "synthetic"
    source_ref: str
    side: str = ""  # "" (whole row), "left" or "right"
    caption: str = ""
    item: str = ""
    category: str = ""
    collection: str = ""
    quality: dict[str, int] = field(default_factory=dict)
    description: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    box: list[float] | None = None  # [x0, y0, x1, y1] pixels of the S×S view
    pose: list[float] | None = None  # 16 floats, row-major object-to-camera, OpenCV
    intrinsics: list[float] | None = None  # 9 floats, row-major, pixels of the S×S view
    focal_px: float | None = None
    mesh_scale: float | None = None  # metres per canonical unit, from calibration
    front_pose: list[float] | None = None  # 16 floats, canonical mesh -> front camera, OpenCV (mesh stage)
    front_intrinsics: list[float] | None = None  # 9 floats, that camera's K in px of the view
    view_azimuths_deg: list[float] | None = None  # azimuth of each orbit view (render stage)
    backends: dict[str, str] = field(default_factory=dict)  # stage -> backend that produced it

    def replace(self, **changes: Any) -> Sample:
        """A copy with `changes`; dict fields are copied so stages never alias each other."""
        base = {f.name: _copy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        base.update(changes)
        return Sample(**base)


def _copy(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else value


STAGE_ERROR = "stage_error"  # drop reason of any stage: it raised on this sample alone

_TRANSIENT_ERRNOS = {
    errno.EIO,
    errno.EAGAIN,
    errno.EBUSY,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
}


def is_transient(err: BaseException) -> bool:
    """I/O hiccups worth retrying as they are (network, timeouts, busy devices)."""
    if isinstance(err, TimeoutError | ConnectionError | BrokenPipeError | InterruptedError):
        return True
    return isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA (or other accelerator) out of memory: retry with a smaller batch."""
    return type(err).__name__ == "OutOfMemoryError" or "out of memory" in str(err).lower()


@dataclass(frozen=True)
class Rejection:
    """Why a sample left the build: `(stage, reason, metric)`; reasons are snake_case constants.

    `transient`: the drop says nothing about the sample (a timeout, out of memory, an I/O error
    that outlived its retries), so the next run tries it again; its task's result is not cached.
    Deterministic drops (`low_iou`, `mesh_not_manifold`, a sample a stage raises on) are results."""

    sample_id: str
    source_id: str
    stage: str
    reason: str
    metric: float | None = None
    detail: str = ""
    transient: bool = False


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def error_detail(err: BaseException, limit: int = 200) -> str:
    """`"<Type>: <message>"` of an exception for a reject's `detail`, without the memory addresses
    that object reprs put in messages (`<_io.BytesIO object at 0x7f...>`), so reruns write equal
    rejects; one line, at most `limit` characters."""
    text = " ".join(_ADDRESS.sub("", f"{type(err).__name__}: {err}").split())
    return text[:limit]


@dataclass
class StageResult:
    """What one stage call did to its samples. `files` names the tables a stage that writes them
    (`shard`) committed, so the build knows its own output and prunes only what it did not write."""

    kept: list[Sample] = field(default_factory=list)
    dropped: list[Rejection] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    # Made from inputs that lost samples to transient drops (here or upstream): not a result either.
    partial: bool = False

    @property
    def transient(self) -> bool:
        """True when this result must not be cached: it has transient drops, or is `partial`."""
        return self.partial or any(r.transient for r in self.dropped)

    def drop(
        self,
        sample: Sample,
        stage: str,
        reason: str,
        metric: float | None = None,
        detail: str = "",
        transient: bool = False,
    ) -> None:
        self.dropped.append(
            Rejection(sample.sample_id, sample.source_id, stage, reason, metric, detail, transient)
        )


# Fields a stage of one DAG branch may fill that a join keeps from whichever parent has them.
_JOINED_FIELDS = ("box", "pose", "intrinsics", "focal_px", "mesh_scale", "front_pose", "front_intrinsics")


def merge_samples(results: list[StageResult]) -> list[Sample]:
    """Samples kept by every one of `results` (a DAG join: all parents of a stage), their
    artifacts, metrics, backends and fields merged, in sample-id order."""
    if len(results) == 1:
        return results[0].kept
    common = set.intersection(*({s.sample_id for s in r.kept} for r in results))
    merged: dict[str, Sample] = {}
    for r in results:
        for s in r.kept:
            if s.sample_id not in common:
                continue
            if s.sample_id not in merged:
                merged[s.sample_id] = s.replace()
                continue
            base = merged[s.sample_id]
            base.artifacts.update(s.artifacts)
            base.metrics.update(s.metrics)
            base.backends.update(s.backends)
            for name in _JOINED_FIELDS:
                if getattr(base, name) is None:
                    setattr(base, name, getattr(s, name))
    return [merged[k] for k in sorted(merged)]


# --------------------------------------------------------------------------- shard schema

_IMAGE = {"_type": "Image"}


def _image_list() -> dict[str, Any]:
    return {"_type": "List", "feature": _IMAGE}


# (name, arrow type, Hugging Face feature). Images are HF `Image` structs {bytes, path}.
_IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_FLOAT32 = {"dtype": "float32", "_type": "Value"}
_FLOAT64 = {"dtype": "float64", "_type": "Value"}
SHARD_COLUMNS: list[tuple[str, pa.DataType, dict[str, Any]]] = [
    ("sample_id", pa.string(), {"dtype": "string", "_type": "Value"}),
    ("source", pa.string(), {"dtype": "string", "_type": "Value"}),
    ("source_id", pa.string(), {"dtype": "string", "_type": "Value"}),
    ("side", pa.string(), {"dtype": "string", "_type": "Value"}),
    ("image", _IMAGE_STRUCT, _IMAGE),
    ("caption", pa.string(), {"dtype": "string", "_type": "Value"}),
    ("item", pa.string(), {"dtype": "string", "_type": "Value"}),
    ("category", pa.string(), {"dtype": "string", "_type": "Value"}),
    ("collection", pa.string(), {"dtype": "string", "_type": "Value"}),
    ("mask", _IMAGE_STRUCT, _IMAGE),
    ("depth", pa.binary(), {"dtype": "binary", "_type": "Value"}),
    ("box", pa.list_(pa.float32()), {"_type": "List", "feature": {"dtype": "float32", "_type": "Value"}}),
    ("pose", pa.list_(pa.float32()), {"_type": "List", "feature": {"dtype": "float32", "_type": "Value"}}),
    (
        "intrinsics",
        pa.list_(pa.float32()),
        {"_type": "List", "feature": {"dtype": "float32", "_type": "Value"}},
    ),
    ("mesh_scale", pa.float64(), _FLOAT64),  # metres per canonical mesh unit
    ("mesh_glb", pa.binary(), {"dtype": "binary", "_type": "Value"}),
    ("point_map", _IMAGE_STRUCT, _IMAGE),
    ("point_map_raw", pa.binary(), {"dtype": "binary", "_type": "Value"}),  # npz, key "xyz"
    ("views_rgb", pa.list_(_IMAGE_STRUCT), _image_list()),
    ("views_point_map", pa.list_(_IMAGE_STRUCT), _image_list()),
    ("view_azimuths_deg", pa.list_(pa.float32()), {"_type": "List", "feature": _FLOAT32}),
    ("mask_iou", pa.float32(), _FLOAT32),
    ("lpips", pa.float32(), _FLOAT32),
    ("metrics", pa.string(), {"dtype": "string", "_type": "Value"}),  # JSON object
    ("backends", pa.string(), {"dtype": "string", "_type": "Value"}),  # JSON object
    ("truth", pa.bool_(), {"dtype": "bool", "_type": "Value"}),  # a ground-truth backend made it
]

REJECT_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("sample_id", pa.string()),
    ("source_id", pa.string()),
    ("stage", pa.string()),
    ("reason", pa.string()),
    ("metric", pa.float64()),
    ("detail", pa.string()),
    ("transient", pa.bool_()),
]


def subjects200k_schema() -> pa.Schema:
    """Arrow schema of a Subjects200K row, as the released Parquet files store it (DESIGN §4)."""
    scores = ("compositeStructure", "objectConsistency", "imageQuality")
    texts = ("item", "description_0", "description_1", "category")
    features = {
        "image": _IMAGE,
        "collection": {"dtype": "string", "_type": "Value"},
        "quality_assessment": {k: {"dtype": "int64", "_type": "Value"} for k in scores},
        "description": {
            **{k: {"dtype": "string", "_type": "Value"} for k in texts},
            "description_valid": {"dtype": "bool", "_type": "Value"},
        },
    }
    fields = [
        ("image", _IMAGE_STRUCT),
        ("collection", pa.string()),
        ("quality_assessment", pa.struct([(k, pa.int64()) for k in scores])),
        ("description", pa.struct([(k, pa.string()) for k in texts] + [("description_valid", pa.bool_())])),
    ]
    return pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": features}})})


def shard_schema(columns: list[str] | None = None) -> pa.Schema:
    """Arrow schema of a shard (all columns, or the named subset in canonical order).

    The `huggingface` metadata makes `datasets.load_dataset("parquet", ...)` decode the image
    columns as PIL images.
    """
    chosen = [c for c in SHARD_COLUMNS if columns is None or c[0] in columns]
    features = {name: feat for name, _, feat in chosen}
    meta = {
        "huggingface": json.dumps({"info": {"features": features}}),
        "refany3d": json.dumps({"shard_schema_version": SHARD_SCHEMA_VERSION}),
    }
    return pa.schema([(name, typ) for name, typ, _ in chosen], metadata=meta)


def reject_schema() -> pa.Schema:
    return pa.schema(REJECT_COLUMNS, metadata={"refany3d": json.dumps({"reject_schema_version": 2})})


def image_cell(data: bytes | None, path: str | None = None) -> dict[str, Any] | None:
    """A Hugging Face `Image` cell."""
    return None if data is None else {"bytes": data, "path": path}
