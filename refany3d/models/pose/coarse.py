"""Coarse pose search: rotation hypotheses, scale from RMS radii, scaled ICP of the observed cloud
to the model, ranked by ray-cast silhouette IoU and depth residual.

DESIGN §4 ("6D pose"): registering the OBSERVED cloud to the model (not the model to the partial
cloud, which shrinks the model) with a similarity ICP finds the basin from a few hundred rotation
starts; what it leaves (scale and depth-axis bias from hidden surfaces) is `refine`'s job.
"""

from __future__ import annotations

import numpy as np

from refany3d.models.pose.model import PoseModel, Similarity, perpendicular_basis
from refany3d.models.pose.observe import Observation, pixel_rays

RANK_DEPTH_TOLERANCE = 0.1  # depth residual (object sizes) at which a coarse pose's agreement is 0
VISIBLE_CELLS = 32  # orthographic grid per view direction (visible-surface RMS radius)
ICP_SCHEDULE = (0.5, 0.25, 0.12, 0.06)  # max correspondence distance in mesh radii, coarse to fine


def fibonacci_sphere(count: int) -> np.ndarray:
    """(count, 3) unit vectors spread evenly over the sphere (deterministic)."""
    i = np.arange(count) + 0.5
    z = 1.0 - 2.0 * i / count
    phi = np.pi * (1.0 + 5**0.5) * i
    r = np.sqrt(1.0 - z**2)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def rotation_hypotheses(directions: int, in_plane: int) -> tuple[np.ndarray, np.ndarray]:
    """(directions * in_plane, 3, 3) object-to-camera rotations and (n,) index of each one's view
    direction: each direction d (object frame, towards the camera) is turned to face the camera
    (camera -z), then rolled about the optical axis in `in_plane` equal steps."""
    rots, index = [], []
    for k, d in enumerate(fibonacci_sphere(directions)):
        a, b = perpendicular_basis(d)
        base = np.stack([a, -b, -d])  # rows: camera x, y, z in object coordinates; det = +1
        for angle in np.arange(in_plane) * 2 * np.pi / in_plane:
            c, s = np.cos(angle), np.sin(angle)
            rots.append(np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ base)
            index.append(k)
    return np.asarray(rots), np.asarray(index)


def _lateral_rms_radius(points: np.ndarray, axis: np.ndarray) -> float:
    """RMS distance of (n, 3) points from their centroid across unit `axis` (the viewing
    direction): the projected extent. Extent along the view is left out: how deep a grazing
    surface reaches changes fast with the direction, its image does not."""
    rel = points - points.mean(axis=0)
    rel = rel - np.outer(rel @ axis, axis)
    return float(np.sqrt((rel**2).sum(axis=1).mean()))


def initial_poses(model: PoseModel, cloud: np.ndarray, directions: int, in_plane: int) -> list[Similarity]:
    """One similarity per rotation hypothesis: scale = lateral RMS radius of the observed cloud
    over that of the model's surface visible from the hypothesis' direction, centroids matched."""
    rots, index = rotation_hypotheses(directions, in_plane)
    centre = cloud.mean(axis=0)
    radius = _lateral_rms_radius(cloud, centre / np.linalg.norm(centre))
    views = fibonacci_sphere(directions)
    visible = [model.cast_orthographic(d, VISIBLE_CELLS) for d in views]
    out = []
    for rot, k in zip(rots, index, strict=True):
        seen = visible[k] if len(visible[k]) >= 8 else model.surface
        scale = radius / max(_lateral_rms_radius(seen, views[k]), 1e-9)
        out.append(Similarity(rot, scale, centre - scale * rot @ seen.mean(axis=0)))
    return out


# Where a mesher returns the object seen from the input view's side (Hunyuan3D), the mesh stage
# records that view's camera (`Sample.front_pose`); the pose stage hands it on in the mesh's
# metadata under this key, and the estimator starts from its rotation too.
FRONT_POSE = "front_pose"


def front_hints(mesh) -> list[np.ndarray]:
    """(3, 3) object-to-camera rotations the mesh carries as hints (`FRONT_POSE`: a (4, 4) pose
    whose rotation maps mesh coordinates into the view's camera), none if it carries none."""
    hint = getattr(mesh, "metadata", {}).get(FRONT_POSE)
    if hint is None:
        return []
    rot = np.asarray(hint, dtype=np.float64).reshape(4, 4)[:3, :3]
    u, _, vt = np.linalg.svd(rot)  # a scaled or slightly skewed pose still gives its rotation
    rot = u @ np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))]) @ vt
    return [rot] if np.isfinite(rot).all() else []


def hint_start(model: PoseModel, cloud: np.ndarray, rotation: np.ndarray) -> Similarity:
    """A start at `rotation`: scale from the lateral RMS radii of the observed cloud and of the
    whole model surface across the viewing direction, centroids matched (refinement then fits
    scale and place; no ray casting, so both paths build the same start)."""
    centre = cloud.mean(axis=0)
    axis = rotation.T @ (centre / np.linalg.norm(centre))  # the viewing ray in mesh coordinates
    scale = _lateral_rms_radius(cloud, centre / np.linalg.norm(centre)) / max(
        _lateral_rms_radius(model.surface, axis), 1e-9
    )
    return Similarity(rotation, scale, centre - scale * rotation @ model.surface.mean(axis=0))


def _umeyama(src: np.ndarray, dst: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, ...]:
    """Batched weighted least-squares similarity dst ≈ c R src + b (Umeyama 1991), the same
    estimate as Open3D's `TransformationEstimationPointToPoint(with_scaling=True)`, for (h, n, 3)
    point pairs and (h, n) weights; returns R (h, 3, 3), c (h,), b (h, 3)."""
    total = np.maximum(weight.sum(axis=1), 1e-12)[:, None]
    w = weight[:, :, None]
    mu_s = (w * src).sum(axis=1) / total
    mu_d = (w * dst).sum(axis=1) / total
    cs, cd = src - mu_s[:, None], dst - mu_d[:, None]
    cov = np.matmul((w * cd).transpose(0, 2, 1), cs) / total[:, :, None]
    var = (w * cs * cs).sum(axis=(1, 2)) / total[:, 0]
    u, d, vt = np.linalg.svd(cov)
    sign = np.ones_like(d)
    sign[:, 2] = np.sign(np.linalg.det(u @ vt))
    rot = u @ (sign[:, :, None] * vt)
    c = (d * sign).sum(axis=1) / np.maximum(var, 1e-18)
    b = mu_d - c[:, None] * np.einsum("hij,hj->hi", rot, mu_s)
    return rot, c, b


def scaled_icp(
    model: PoseModel, cloud: np.ndarray, starts: list[Similarity], iterations: int, max_scale_change: float
) -> tuple[list[Similarity], np.ndarray]:
    """Similarity ICP of the observed cloud (n, 3, camera frame) to the model surface (mesh
    frame) from every start at once, coarse to fine (`ICP_SCHEDULE` distances over `iterations`
    steps); returns the poses and (h,) trimmed mean distance in mesh radii (unmatched points
    count as the final distance). Each pose's scale stays within `max_scale_change`× its
    start's: a partial cloud can otherwise shrink towards a point on the surface."""
    rot = np.stack([p.rotation.T for p in starts])  # camera → mesh: x = c A p + b
    c = np.array([1.0 / p.scale for p in starts])
    b = -c[:, None] * np.einsum("hij,hj->hi", rot, np.stack([p.translation for p in starts]))
    c_lo, c_hi = c / max_scale_change, c * max_scale_change
    src = np.broadcast_to(cloud, (len(starts),) + cloud.shape)
    for step in range(iterations):
        limit = _schedule(step, iterations) * model.radius
        x = c[:, None, None] * np.matmul(src, rot.transpose(0, 2, 1)) + b[:, None]
        dst, inside = model.closest(x)
        matched = inside & (np.linalg.norm(dst - x, axis=-1) < limit)
        rot, c, b = _umeyama(src, dst, matched.astype(np.float64))
        clipped = np.clip(c, c_lo, c_hi)
        b = b + (c - clipped)[:, None] * np.einsum("hij,j->hi", rot, cloud.mean(axis=0))
        c = clipped
    x = c[:, None, None] * np.matmul(src, rot.transpose(0, 2, 1)) + b[:, None]
    dst, inside = model.closest(x)
    dist = np.where(inside, np.minimum(np.linalg.norm(dst - x, axis=-1), limit), limit) / model.radius
    poses = [Similarity(r.T, 1.0 / ci, -(1.0 / ci) * r.T @ bi) for r, ci, bi in zip(rot, c, b, strict=True)]
    return poses, dist.mean(axis=1)


def _schedule(step: int, iterations: int) -> float:
    """Correspondence distance (mesh radii) of ICP step `step`: `ICP_SCHEDULE` stretched over
    `iterations` steps."""
    position = step * len(ICP_SCHEDULE) // max(iterations, 1)
    return ICP_SCHEDULE[min(position, len(ICP_SCHEDULE) - 1)]


def rank_score(model: PoseModel, obs: Observation, pose: Similarity) -> float:
    """Grid silhouette IoU times the mean depth agreement (1 at zero residual, falling linearly
    to 0 at `RANK_DEPTH_TOLERANCE` of the object's size; pixels the render misses count 0)."""
    hits = model.cast(pixel_rays(obs.grid_uv, obs.intrinsics), pose)
    union = np.count_nonzero(hits.hit | obs.grid_mask)
    iou = np.count_nonzero(hits.hit & obs.grid_mask) / max(union, 1)
    observed = obs.grid_depth > 0
    tolerance = RANK_DEPTH_TOLERANCE * pose.scale * model.radius + 3.0 * obs.depth_noise
    residual = np.where(hits.hit, np.abs(hits.depth - obs.grid_depth), np.inf)[observed]
    agreement = np.clip(1.0 - residual / tolerance, 0.0, 1.0)
    return float(iou * agreement.mean()) if agreement.size else 0.0


def coarse_candidates(
    model: PoseModel, obs: Observation, directions: int, in_plane: int, keep: int
) -> list[tuple[float, Similarity]]:
    """(score, pose) of the `keep` best hypotheses after ICP, ranked by `rank_score`, best first.

    All starts run a short ICP on a sparse cloud; the better half by ICP error continues on a
    denser one and is ranked by ray casting (ICP error alone cannot tell a box's faces apart)."""
    starts = initial_poses(model, obs.cloud, directions, in_plane)
    sparse = obs.cloud[np.linspace(0, len(obs.cloud) - 1, min(len(obs.cloud), 150)).astype(int)]
    poses, error = scaled_icp(model, sparse, starts, 12, 1.4)
    survivors = [poses[i] for i in np.argsort(error, kind="stable")[: max(keep, len(starts) // 2)]]
    dense = obs.cloud[np.linspace(0, len(obs.cloud) - 1, min(len(obs.cloud), 400)).astype(int)]
    poses, _ = scaled_icp(model, dense, survivors, 10, 1.25)
    scored = [(rank_score(model, obs, pose), pose) for pose in poses]
    scored.sort(key=lambda item: -item[0])
    return scored[:keep]
