"""Pose-estimation cases with exact answers: a metric mesh seen at a known pose, the "mesher output"
(the same mesh moved into a canonical frame), and the view's depth and mask perturbed the way the
perception stages err. Used by the pose tests and `bench/pose_bench.py`.

The reference answer accounts for what no estimator can see: a global depth-scale error `d` and a
focal-length error `e` (the estimator gets K with focal e·f) make the scene that explains both the
image and the depth the true one scaled by d/e across and d along the optical axis. So the
reference similarity has the true rotation, scale s·d/e and translation (d/e tx, d/e ty, d tz).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import trimesh
from scipy.spatial.transform import Rotation

from refany3d.render.cameras import intrinsics_from_fov
from refany3d.render.mesh import normalize_transform
from refany3d.render.raycast import raycast_maps


@dataclass(frozen=True)
class Perturbation:
    """How the inputs err. depth_scale / focal: std of the global log errors; depth_noise: relative
    per-pixel noise; flying_px: width of the band at depth edges where depth blends foreground and
    a background plane (0: no background, depth unknown off the object); mask_px: boundary shift
    along a smooth random field, up to this many px; mask_bias_px: plus a uniform erosion or
    dilation of up to this many px; canonical_deg: max rotation of the mesh in its canonical frame.

    The defaults are the synthetic source's `truth` backends' (depth and segmenter settings)."""

    depth_scale: float = 0.1
    focal: float = 0.05
    depth_noise: float = 0.005
    flying_px: int = 0
    mask_px: float = 2.0
    mask_bias_px: float = 0.0
    canonical_deg: float = 10.0


# Harder than the truth backends: flying pixels at edges and masks off by up to ±3 px overall.
HARSH = Perturbation(flying_px=2, mask_px=2.0, mask_bias_px=1.0)


@dataclass(frozen=True)
class PoseCase:
    """mesh: (canonical) what the estimator gets; depth (H, W) float32, mask (H, W) bool,
    intrinsics (3, 3) the estimator's K; pose (4, 4) and scale: the reference answer in the
    contract's form (x_cam = R (scale x_mesh) + t); true_mask: the exact silhouette."""

    name: str
    mesh: trimesh.Trimesh
    depth: np.ndarray
    mask: np.ndarray
    intrinsics: np.ndarray
    pose: np.ndarray
    scale: float
    true_mask: np.ndarray


def canonicalize(
    mesh: trimesh.Trimesh, rng: np.random.Generator, max_deg: float
) -> tuple[trimesh.Trimesh, np.ndarray]:
    """(mesh turned by a small random rotation and normalised into [-1, 1]³ like the mesher's
    output, (4, 4) similarity from the metric frame to that canonical frame)."""
    turn = np.eye(4)
    turn[:3, :3] = Rotation.from_rotvec(_random_axis(rng) * np.radians(rng.uniform(0, max_deg))).as_matrix()
    turned = mesh.copy()
    turned.apply_transform(turn)
    to_canonical = normalize_transform(turned) @ turn
    out = mesh.copy()
    out.apply_transform(to_canonical)
    return out, to_canonical


def _random_axis(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def random_view(rng: np.random.Generator, mesh: trimesh.Trimesh, k: np.ndarray, size: int) -> np.ndarray:
    """(4, 4) object-to-camera pose (OpenCV) of a random rotation (any, not only upright) with the
    object filling 15–35 % of the view side in radius, off centre."""
    rot = Rotation.random(random_state=int(rng.integers(2**31))).as_matrix()
    centre = mesh.bounds.mean(axis=0)
    radius = float(np.linalg.norm(mesh.vertices - centre, axis=1).max())
    fill = rng.uniform(0.15, 0.35)
    dist = k[0, 0] * radius / (fill * size)
    shift = (0.5 - fill) * 0.5 * size
    u, v = k[0, 2] + rng.uniform(-shift, shift), k[1, 2] + rng.uniform(-shift, shift)
    pose = np.eye(4)
    pose[:3, :3] = rot
    pose[:3, 3] = dist * np.linalg.solve(k, [u, v, 1.0]) - rot @ centre
    return pose


def make_case(
    name: str,
    mesh: trimesh.Trimesh,
    pose: np.ndarray,
    intrinsics: np.ndarray,
    size: int,
    perturb: Perturbation,
    rng: np.random.Generator,
) -> PoseCase:
    """A case of metric `mesh` at `pose` seen with `intrinsics` on a size × size view (exact
    silhouette and depth by ray casting, then perturbed)."""
    maps = raycast_maps(mesh, pose, intrinsics, size, size)
    return perturb_view(name, mesh, pose, intrinsics, maps["mask"], maps["depth"], perturb, rng)


def perturb_view(
    name: str,
    mesh: trimesh.Trimesh,
    pose: np.ndarray,
    intrinsics: np.ndarray,
    mask: np.ndarray,
    depth: np.ndarray,
    perturb: Perturbation,
    rng: np.random.Generator,
) -> PoseCase:
    """A case from an exact view (mask (H, W) bool, depth (H, W) metres) of metric `mesh` at `pose`."""
    if mask.sum() < 64:
        raise ValueError(f"{name}: the object is not in view")
    d_scale = float(np.exp(rng.normal(0, perturb.depth_scale)))
    f_scale = float(np.exp(rng.normal(0, perturb.focal)))
    seen = np.asarray(depth, dtype=np.float64)
    if perturb.flying_px > 0:
        seen = np.where(mask, seen, _background_depth(seen[mask], mask.shape, rng))
        seen = _flying_pixels(seen, mask, perturb.flying_px)
    seen = seen * d_scale * (1 + rng.normal(0, perturb.depth_noise, seen.shape))
    k_est = np.asarray(intrinsics, dtype=np.float64).copy()
    k_est[0, 0] *= f_scale
    k_est[1, 1] *= f_scale
    canonical, to_canonical = canonicalize(mesh, rng, perturb.canonical_deg)
    # x_cam = pose · to_canonical⁻¹ · x_can: a similarity with scale 1 / |to_canonical|.
    sim = pose @ np.linalg.inv(to_canonical)
    scale = float(np.cbrt(np.linalg.det(sim[:3, :3])))
    across = d_scale / f_scale
    ref = np.eye(4)
    ref[:3, :3] = sim[:3, :3] / scale
    ref[:3, 3] = sim[:3, 3] * np.array([across, across, d_scale])
    return PoseCase(
        name=name,
        mesh=canonical,
        depth=seen.astype(np.float32),
        mask=noisy_mask(mask, perturb.mask_px, perturb.mask_bias_px, rng),
        intrinsics=k_est,
        pose=ref,
        scale=scale * across,
        true_mask=mask,
    )


def _background_depth(
    object_depth: np.ndarray, shape: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """(H, W) a tilted floor/wall plane behind the object (what flying pixels blend with)."""
    far = float(object_depth.max()) * rng.uniform(1.3, 2.0)
    v, u = np.mgrid[0 : shape[0], 0 : shape[1]] / max(shape)
    return (far * (1.0 + 0.3 * (v - 0.5) + 0.1 * (u - 0.5))).astype(np.float64)


def _flying_pixels(depth: np.ndarray, mask: np.ndarray, width: int) -> np.ndarray:
    """Depth with the pixels within `width` px of the silhouette replaced by a blend of the
    foreground and background depths (what stereo and monocular networks do at edges)."""
    if width <= 0:
        return depth
    m = mask.astype(np.uint8)
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    edge = (cv2.dilate(m, kernel) - cv2.erode(m, kernel)).astype(bool)
    blurred = cv2.blur(depth, (2 * width + 1, 2 * width + 1))
    return np.where(edge, blurred, depth)


def noisy_mask(mask: np.ndarray, field_px: float, bias_px: float, rng: np.random.Generator) -> np.ndarray:
    """(H, W) bool: `mask` with its boundary moved in and out by up to `field_px` along a smooth
    random field (the `truth` segmenter's model of a segmenter's error), then eroded or dilated
    as a whole by a uniform draw in [-bias_px, bias_px]."""
    if field_px <= 0 and bias_px <= 0:
        return mask.copy()
    m = mask.astype(np.uint8)
    signed = cv2.distanceTransform(m, cv2.DIST_L2, 3) - cv2.distanceTransform(1 - m, cv2.DIST_L2, 3)
    sigma = 4.0 * max(field_px, 1.0)
    field = cv2.GaussianBlur(rng.standard_normal(mask.shape).astype(np.float32), (0, 0), sigma)
    field = np.clip(field / max(float(field.std()), 1e-6) * 0.5, -1.0, 1.0) * field_px
    return (signed + field + rng.uniform(-bias_px, bias_px)) > 0


def default_intrinsics(rng: np.random.Generator, size: int) -> np.ndarray:
    return intrinsics_from_fov(rng.uniform(35, 55), size, size)


@dataclass(frozen=True)
class PoseErrors:
    """rotation_deg: angle between estimated and reference rotations; add_s / add: mean
    closest-point / same-point distance of the surface under both poses, as a fraction of the
    object's diameter; scale: |s_est / s_ref - 1|."""

    rotation_deg: float
    add_s: float
    add: float
    scale: float


def pose_errors(case: PoseCase, pose: np.ndarray, scale: float, samples: int = 2000) -> PoseErrors:
    """Errors of an estimate (contract form: x_cam = R (scale x_mesh) + t) against the case's answer."""
    from scipy.spatial import cKDTree

    points, _ = trimesh.sample.sample_surface_even(case.mesh, samples, seed=0)
    points = np.asarray(points, dtype=np.float64)
    ref = case.scale * points @ case.pose[:3, :3].T + case.pose[:3, 3]
    est = scale * points @ np.asarray(pose)[:3, :3].T + np.asarray(pose)[:3, 3]
    diameter = case.scale * _diameter(case.mesh)
    rel = np.asarray(pose)[:3, :3] @ case.pose[:3, :3].T
    angle = float(np.degrees(np.arccos(np.clip((np.trace(rel) - 1) / 2, -1.0, 1.0))))
    add_s = float(cKDTree(est).query(ref)[0].mean()) / diameter
    add = float(np.linalg.norm(ref - est, axis=1).mean()) / diameter
    return PoseErrors(angle, add_s, add, abs(scale / case.scale - 1.0))


def _diameter(mesh: trimesh.Trimesh) -> float:
    """Largest distance between two points of the mesh (over its convex hull's vertices)."""
    from scipy.spatial.distance import pdist

    hull = np.asarray(mesh.convex_hull.vertices, dtype=np.float64)
    return float(pdist(hull).max())
