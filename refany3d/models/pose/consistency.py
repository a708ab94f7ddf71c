"""Does a posed mesh agree with the view's depth? What a silhouette cannot see — a pose turned
to a look-alike face, a scale (and distance) off by a few per cent — shows in the depth of the
mask's interior. Used by the verify stage (`depth_mismatch`).

Only the interior counts: the mask eroded, less the pixels next to a depth discontinuity, where
networks smear the object into the backdrop (flying pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refany3d.models.pose.model import PoseModel, Similarity
from refany3d.models.pose.observe import depth_edges, depth_noise_std, interior_mask, pixel_rays

MAX_PIXELS = 4000  # an even subsample of the interior: the statistics need no more


@dataclass(frozen=True)
class DepthConsistency:
    """offset: median of (observed − rendered) depth over the interior pixels the mesh covers, as a
    fraction of the object's size (its bounding-box diagonal); inliers: share of the interior
    pixels whose observed depth lies within the tolerance of the rendered one (pixels the mesh
    misses count as outliers); pixels: interior pixels compared."""

    offset: float
    inliers: float
    pixels: int


def depth_consistency(
    model: PoseModel,
    pose: Similarity,
    depth: np.ndarray,
    mask: np.ndarray,
    intrinsics: np.ndarray,
    *,
    erosion_px: int = 4,
    tolerance: float = 0.05,
) -> DepthConsistency:
    """Agreement of `model` posed by `pose` with `depth` (H, W) metres z-depth (0 = unknown)
    inside `mask` (H, W) bool, seen with (3, 3) OpenCV `intrinsics`. `tolerance`: inlier band as
    a fraction of the object's size, widened by 3 σ of the view's per-pixel depth noise."""
    depth = np.nan_to_num(np.asarray(depth, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    k = np.asarray(intrinsics, dtype=np.float64).reshape(3, 3)
    interior = interior_mask(np.asarray(mask, bool), depth, erosion_px, float(k[0, 0]))
    smooth = interior & ~depth_edges(depth)
    if smooth.sum() >= 0.25 * interior.sum():  # a thin part seen edge-on may be all edge
        interior = smooth
    vs, us = np.nonzero(interior)
    if us.size == 0:
        return DepthConsistency(0.0, 0.0, 0)
    keep = np.linspace(0, us.size - 1, min(us.size, MAX_PIXELS)).astype(np.int64)
    vs, us = vs[keep], us[keep]
    hits = model.cast(pixel_rays(np.stack([us, vs], axis=1).astype(np.float64), k), pose)
    size = 2.0 * pose.scale * model.radius
    residual = depth[vs, us] - hits.depth
    limit = tolerance * size + 3.0 * depth_noise_std(depth, interior)
    inliers = float(np.mean(hits.hit & (np.abs(residual) < limit)))
    offset = float(np.median(residual[hits.hit]) / size) if hits.hit.any() else 0.0
    return DepthConsistency(offset, inliers, int(us.size))
