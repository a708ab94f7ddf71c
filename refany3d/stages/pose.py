"""Pose stage: calibrate and pose each sample's canonical mesh in its view (DESIGN §4, "6D pose").

Reads the mesh GLB, the depth npz, the mask PNG and `intrinsics`; writes `pose` (16 floats,
row-major: x_cam = R (mesh_scale x_mesh) + t, OpenCV camera), `mesh_scale` (metres per canonical
unit, the calibration), metrics `pose_score` (the estimator's confidence) and
`depth_outlier_ratio` (masked depth the posed mesh does not explain), and `backends["pose"]`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
import trimesh

from refany3d.config import BuildSettings, PoseSettings
from refany3d.models.pose import PoseResult, coarse, load_pose_estimator
from refany3d.models.pose.calibrate import depth_outlier_ratio
from refany3d.records import DEPTH, IMAGE, MASK, MESH, Sample, StageResult
from refany3d.render.mesh import load_mesh
from refany3d.stages._views import Outcome, read_depth, read_mask, read_view, record
from refany3d.stages.context import StageContext

STAGE = "pose"
POSE_FAILED = "pose_failed"  # the estimator raised or found nothing
MISSING_INPUT = "missing_input"  # no mesh, depth, mask, intrinsics (or image, for RGB backends)

__all__ = ["POSE_FAILED", "MISSING_INPUT", "PoseResult", "estimate_pose", "pose"]


def estimate_pose(
    mesh: trimesh.Trimesh,
    depth: np.ndarray,
    mask: np.ndarray,
    K: np.ndarray,
    rgb: np.ndarray | None = None,
    *,
    options: PoseSettings | None = None,
) -> PoseResult:
    """Pose and metric scale of `mesh` (its own frame, any scale) in one view.

    depth: (H, W) float32 metres z-depth (0 = unknown); mask: (H, W) bool; K: (3, 3) OpenCV
    intrinsics; rgb: (H, W, 3) uint8, used by backends that want it. Returns `PoseResult`:
    `pose` (4, 4) maps mesh coordinates MULTIPLIED BY `scale` into the camera frame, `scale`
    metres per mesh unit, `score` the estimator's confidence. Raises `PoseNotFound` when nothing
    fits. `options` picks the backend and its settings (default: `PoseSettings()`)."""
    return load_pose_estimator(options or PoseSettings()).estimate(mesh, depth, mask, K, rgb)


def _inputs(sample: Sample, estimator, ctx: StageContext):
    """(mesh, depth, mask, K, rgb) of the sample, or (reason, metric, detail) of its drop."""
    needed = (MESH, DEPTH, MASK, IMAGE) if estimator.needs_rgb else (MESH, DEPTH, MASK)
    missing = [role for role in needed if role not in sample.artifacts]
    if missing or sample.intrinsics is None:
        return MISSING_INPUT, None, ", ".join(missing or ["intrinsics"])
    mesh = load_mesh(ctx.store.get(sample.artifacts[MESH]), file_type="glb")
    if sample.front_pose is not None:  # the mesher's view of the object: a start for the search
        mesh.metadata[coarse.FRONT_POSE] = np.asarray(sample.front_pose, dtype=np.float64).reshape(4, 4)
    depth = read_depth(ctx.store, sample.artifacts[DEPTH])
    mask = np.asarray(read_mask(ctx.store, sample.artifacts[MASK])) > 127
    k = np.asarray(sample.intrinsics, dtype=np.float64).reshape(3, 3)
    rgb = np.asarray(read_view(ctx.store, sample)) if estimator.needs_rgb else None
    return mesh, depth, mask, k, rgb


def _finish(sample: Sample, view, found: PoseResult | Exception, opts: PoseSettings) -> Outcome:
    """The kept sample with its pose and scale, or (reason, metric, detail) of its drop."""
    if isinstance(found, Exception):  # any estimator failure is this sample's, never the run's
        return POSE_FAILED, None, f"{type(found).__name__}: {found}"
    if not (np.isfinite(found.pose).all() and np.isfinite(found.scale) and found.scale > 0):
        return POSE_FAILED, None, f"non-finite pose or scale {found.scale}"
    mesh, depth, mask, k, _ = view
    outliers = depth_outlier_ratio(mesh, found.pose, found.scale, depth, mask, k, opts.outlier_tolerance)
    out = sample.replace(
        pose=[float(v) for v in np.asarray(found.pose).ravel()], mesh_scale=float(found.scale)
    )
    out.metrics.update(pose_score=float(found.score), depth_outlier_ratio=outliers)
    if found.margin is not None:  # how sure the estimator is of this answer over another
        out.metrics["pose_margin"] = float(found.margin)
    return out


def _estimate_one(estimator, view, device: Callable[[], AbstractContextManager]) -> PoseResult | Exception:
    try:
        with device():
            return estimator.estimate(*view)
    except Exception as err:
        return err


def pose(samples: list[Sample], settings: BuildSettings, ctx: StageContext) -> StageResult:
    result = StageResult()
    if not samples:
        return result
    estimator = load_pose_estimator(settings)
    views = [_inputs(sample, estimator, ctx) for sample in samples]
    ready = [i for i, view in enumerate(views) if len(view) == 5]
    found: dict[int, PoseResult | Exception] | None = None
    batched = getattr(estimator, "estimate_many", None)  # the GPU path poses a batch at once
    if batched is not None:
        try:
            found = dict(zip(ready, batched([views[i][:4] for i in ready], device=ctx.device), strict=True))
        except Exception:  # the batch failed (out of memory, say): each sample alone
            found = None
    if found is None:
        found = {i: _estimate_one(estimator, views[i], ctx.device) for i in ready}
    outcomes = [
        _finish(sample, views[i], found[i], settings.pose) if i in found else views[i]
        for i, sample in enumerate(samples)
    ]
    record(result, STAGE, estimator.name, samples, outcomes)
    return result
