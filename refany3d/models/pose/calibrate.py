"""Calibration: the metric scale of a canonical mesh comes out of the pose fit (`PoseResult.scale`,
metres per mesh unit); what is left to report is how much of the masked depth disagrees with the
posed mesh — the depth outliers inside the mask (flying pixels, background seen through a loose
mask, a depth network's local failures)."""

from __future__ import annotations

import numpy as np
import trimesh

from refany3d.models.pose.model import PoseModel, Similarity
from refany3d.models.pose.observe import depth_noise_std, interior_mask, pixel_rays


def similarity(pose: np.ndarray, scale: float) -> Similarity:
    """A contract pose ((4, 4) or its 16 row-major floats, x_cam = R (scale x_mesh) + t) as a
    Similarity."""
    pose = np.asarray(pose, dtype=np.float64).reshape(4, 4)
    return Similarity(pose[:3, :3], float(scale), pose[:3, 3])


def depth_outlier_ratio(
    mesh: trimesh.Trimesh | PoseModel,
    pose: np.ndarray,
    scale: float,
    depth: np.ndarray,
    mask: np.ndarray,
    intrinsics: np.ndarray,
    tolerance: float = 0.03,
) -> float:
    """Fraction of the mask's pixels covered by the posed mesh whose depth is missing or farther
    than `tolerance` × the object's size (+ 3 σ of the view's depth noise) from the mesh's.

    mesh in its own frame; pose (4, 4) and scale as in `PoseResult`; depth (H, W) metres z-depth
    (0 = unknown); mask (H, W) bool; intrinsics (3, 3) OpenCV K. 1.0 when the mesh covers none
    of the mask."""
    model = mesh if isinstance(mesh, PoseModel) else PoseModel(mesh)
    mask = np.asarray(mask, dtype=bool)
    depth = np.nan_to_num(np.asarray(depth, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    vs, us = np.nonzero(mask)
    uv = np.stack([us, vs], axis=1).astype(np.float64)
    hits = model.cast(pixel_rays(uv, intrinsics), similarity(pose, scale))
    if not hits.hit.any():
        return 1.0
    observed = depth[vs, us]
    noise = depth_noise_std(depth, interior_mask(mask, depth, 2))
    limit = tolerance * scale * model.radius + 3.0 * noise
    bad = (observed <= 1e-3) | (np.abs(observed - hits.depth) > limit)
    return float(np.count_nonzero(bad & hits.hit) / np.count_nonzero(hits.hit))
