"""Pose-estimation cases with exact answers: a metric mesh seen at a known pose, the "mesher output"
(the same mesh moved into a canonical frame), and the view's depth and mask perturbed the way the
perception stages err. Used by the pose tests and `bench/pose_bench.py`.

The reference answer accounts for what no estimator can see: a depth-scale error `d` at the object
(the global one times the low-frequency field's mean over the object) and a focal-length error `e`
(the estimator gets K with focal e·f) make the scene that explains both the image and the depth the
true one scaled by d/e across and d along the optical axis. The reference similarity has the true
rotation, scale s·d/e and translation (d/e tx, d/e ty, d tz): it reproduces the image exactly and
the object's distance, but, where e ≠ 1, not its relief (no similarity does), so an estimate may
be off from it by up to about (object radius / distance) · |1/e - 1| in scale through no fault of
its own. The accuracy sets (`CLEAN`, `REALISTIC`) therefore use the true focal length; `focal`
adds the error where a test wants it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import trimesh
from scipy.spatial.transform import Rotation

from refany3d.config import DepthSettings, MesherSettings, SegmenterSettings
from refany3d.render.cameras import intrinsics_from_fov
from refany3d.render.mesh import normalize_transform
from refany3d.render.raycast import raycast_maps
from refany3d.synthetic.perception_errors import DepthErrors, MaskErrors, erred_depth, erred_mask


@dataclass(frozen=True)
class Perturbation:
    """How the inputs err. depth / mask: the perception errors (`perception_errors`); focal: std
    of the global log focal-length error; canonical_deg: max rotation of the mesh in its canonical
    frame; mesher: give the estimator the mesher's surface (the `truth` mesher's re-meshing at
    `mesher.truth_resolution`, then the mesh stage's clean-up and reduction to
    `mesher.target_faces`) instead of the source mesh."""

    depth: DepthErrors
    mask: MaskErrors
    focal: float = 0.05
    canonical_deg: float = 3.0
    mesher: bool = True


NO_DEPTH_ERRORS = DepthErrors(scale=0.0, low_frequency=0.0, noise=0.0, flying_px=0, backdrop=None)
NO_MASK_ERRORS = MaskErrors(wobble_px=0.0, bias_px=0.0, ragged_px=0.0, bleed_px=0.0, bleed_arc=0.0)
# Exact ray-cast depth and masks (0 depth off the object); the mesh is still the mesher's.
CLEAN = Perturbation(NO_DEPTH_ERRORS, NO_MASK_ERRORS, focal=0.0)
# The `truth` backends' depth and mask errors: what the build's embedded default gives the
# estimator (at the true focal length, see the module doc).
REALISTIC = Perturbation(DepthErrors.of(DepthSettings()), MaskErrors.of(SegmenterSettings()), focal=0.0)


def mesher_surface(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """What the mesh stage makes of `mesh` with the `truth` mesher: a new closed surface by
    marching cubes, cleaned and reduced as every generated surface is (same frame and units)."""
    from refany3d.models.mesher.truth import remesh
    from refany3d.render.mesh import clean_and_reduce, repair_mesh

    opts = MesherSettings()
    surface = remesh(repair_mesh(mesh), opts.truth_resolution)
    if surface is None:
        raise ValueError("the re-meshed surface is empty")
    return clean_and_reduce(surface, opts.target_faces, opts.coarse_factor)


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
    """(`mesh` turned by a small random rotation and normalised into [-1, 1]³ like the mesher's
    output, (4, 4) similarity from `mesh`'s frame to that canonical frame)."""
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
    surface: trimesh.Trimesh | None = None,
) -> PoseCase:
    """A case of metric `mesh` at `pose` seen with `intrinsics` on a size × size view (exact
    silhouette and depth by ray casting, then perturbed). `surface`: `mesher_surface(mesh)` if
    already made (it costs seconds; cases of one mesh share it)."""
    maps = raycast_maps(mesh, pose, intrinsics, size, size)
    return perturb_view(name, mesh, pose, intrinsics, maps["mask"], maps["depth"], perturb, rng, surface)


def perturb_view(
    name: str,
    mesh: trimesh.Trimesh,
    pose: np.ndarray,
    intrinsics: np.ndarray,
    mask: np.ndarray,
    depth: np.ndarray,
    perturb: Perturbation,
    rng: np.random.Generator,
    surface: trimesh.Trimesh | None = None,
) -> PoseCase:
    """A case from an exact view (mask (H, W) bool, depth (H, W) metres) of metric `mesh` at `pose`."""
    if mask.sum() < 64:
        raise ValueError(f"{name}: the object is not in view")
    seen = erred_depth(depth, mask, perturb.depth, rng)
    f_scale = float(np.exp(rng.normal(0, perturb.focal)))
    k_est = np.asarray(intrinsics, dtype=np.float64).copy()
    k_est[0, 0] *= f_scale
    k_est[1, 1] *= f_scale
    given = mesh
    if perturb.mesher:
        given = surface if surface is not None else mesher_surface(mesh)
    canonical, to_canonical = canonicalize(given, rng, perturb.canonical_deg)
    # x_cam = pose · to_canonical⁻¹ · x_can: a similarity with scale 1 / |to_canonical|.
    sim = pose @ np.linalg.inv(to_canonical)
    scale = float(np.cbrt(np.linalg.det(sim[:3, :3])))
    across = seen.local_scale / f_scale
    ref = np.eye(4)
    ref[:3, :3] = sim[:3, :3] / scale
    ref[:3, 3] = sim[:3, 3] * np.array([across, across, seen.local_scale])
    return PoseCase(
        name=name,
        mesh=canonical,
        depth=seen.depth,
        mask=erred_mask(mask, perturb.mask, rng),
        intrinsics=k_est,
        pose=ref,
        scale=scale * across,
        true_mask=mask,
    )


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
