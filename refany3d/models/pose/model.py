"""The mesh side of pose estimation: a ray-casting structure, face normals and surface samples of
the canonical mesh, and ray casting at a similarity pose.

A similarity pose is (R, s, t): x_cam = s R x_mesh + t, R (3, 3) float64 rotation, s metres per
mesh unit, t (3,) metres (OpenCV camera). With the mesh in its canonical frame (bounding-box centre
at the origin), t is where the box centre sits in the camera frame.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import trimesh
from scipy.spatial import cKDTree

SURFACE_SAMPLES = 3000
CLOSEST_CELLS = 40  # closest-point lookup grid per axis (coarse ICP correspondences)


@dataclass(frozen=True)
class Similarity:
    """x_cam = scale * rotation @ x_mesh + translation."""

    rotation: np.ndarray
    scale: float
    translation: np.ndarray

    def matrix(self) -> np.ndarray:
        """(4, 4) float64 pose that maps mesh coordinates MULTIPLIED BY `scale` into the camera."""
        out = np.eye(4)
        out[:3, :3] = self.rotation
        out[:3, 3] = self.translation
        return out

    def apply(self, points: np.ndarray) -> np.ndarray:
        """(n, 3) mesh points → (n, 3) camera points."""
        return self.scale * points @ self.rotation.T + self.translation


@dataclass(frozen=True)
class Hits:
    """Ray-cast result for n rays: hit (n,) bool, depth (n,) float64 z-depth (0 where missed),
    points (n, 3) float64 mesh-frame hit points, normals (n, 3) float64 camera-frame unit normals
    of the hit faces (0 where missed)."""

    hit: np.ndarray
    depth: np.ndarray
    points: np.ndarray
    normals: np.ndarray


class PoseModel:
    """A mesh (in its own frame, any scale) prepared for registration and render-and-compare."""

    def __init__(self, mesh: trimesh.Trimesh, seed: int = 0) -> None:
        self.vertices = np.asarray(mesh.vertices, dtype=np.float64)
        self.faces = np.asarray(mesh.faces, dtype=np.int64)
        if len(self.faces) == 0:
            raise ValueError("pose: the mesh has no faces")
        tri = self.vertices[self.faces]
        normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        self.face_normals = normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
        lo, hi = self.vertices.min(axis=0), self.vertices.max(axis=0)
        self.center = (lo + hi) / 2.0
        self.extent = hi - lo  # the box's sides along the mesh axes
        self.radius = float(np.linalg.norm(self.extent) / 2.0)  # half the box diagonal
        self.surface = _surface_samples(self.vertices, self.faces, SURFACE_SAMPLES, seed)
        self.tree = cKDTree(self.surface)
        # the pivot of `builtin`'s axis sweeps: a handle moves the median less than the mean
        self.median = np.median(self.surface, axis=0)

    @functools.cached_property
    def scene(self):
        """Open3D's ray-casting structure, built on first use: the GPU path casts in torch and
        needs none (nor Open3D)."""
        import open3d as o3d

        scene = o3d.t.geometry.RaycastingScene()
        scene.add_triangles(self.vertices.astype(np.float32), self.faces.astype(np.uint32))
        return scene

    def surface_samples(self, count: int) -> np.ndarray:
        """An even subset of about `count` of `surface`, centred on the box centre (what
        `surface_distance` turns)."""
        return self.surface[:: max(1, len(self.surface) // count)] - self.center

    @functools.cached_property
    def _closest(self) -> _ClosestGrid:
        """Built on first use: only the coarse search needs it, scoring and calibration do not."""
        return _ClosestGrid(self.surface, self.tree, self.center, 1.6 * self.radius, CLOSEST_CELLS)

    @property
    def closest_table(self) -> np.ndarray:
        """(CLOSEST_CELLS³,) int64 index into `surface` of each grid cell's nearest sample: what
        `closest` looks up (cells of a cube 3.2 radii wide about `center`, x-major)."""
        return self._closest.index

    def closest(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """((n, 3) surface sample nearest each (n, 3) mesh-frame point — to within a grid cell —,
        (n,) bool whether the point is inside the grid at all)."""
        return self._closest(points)

    def surface_distance(self, turn: np.ndarray, count: int) -> float:
        """Mean distance (mesh units) from `count` surface samples turned by the (3, 3) rotation
        `turn` about the box centre to the surface itself: 0 for a symmetry of the shape."""
        import open3d as o3d

        points = self.surface_samples(count)
        turned = (points @ np.asarray(turn).T + self.center).astype(np.float32)
        return float(self.scene.compute_distance(o3d.core.Tensor(turned)).numpy().mean())

    def cast(self, rays_cam: np.ndarray, pose: Similarity) -> Hits:
        """Cast camera-frame rays (n, 3, z = 1, from the camera centre) at the mesh posed by `pose`."""
        import open3d as o3d

        rot, s, t = pose.rotation, pose.scale, pose.translation
        origin = -rot.T @ t / s
        dirs = rays_cam @ rot / s  # rows: R^T d / s
        rays = np.concatenate([np.broadcast_to(origin, dirs.shape), dirs], axis=1).astype(np.float32)
        out = self.scene.cast_rays(o3d.core.Tensor(rays))
        t_hit = out["t_hit"].numpy().astype(np.float64)
        hit = np.isfinite(t_hit)
        depth = np.where(hit, t_hit, 0.0)
        points = np.where(hit[:, None], origin + dirs * depth[:, None], 0.0)
        face = np.where(hit, out["primitive_ids"].numpy().astype(np.int64), 0)
        normals = np.where(hit[:, None], self.face_normals[face] @ rot.T, 0.0)
        # Face winding may point away from the camera (open or flipped meshes): face the ray.
        flip = np.einsum("ij,ij->i", normals, rays_cam) > 0
        normals[flip] *= -1.0
        return Hits(hit, depth, points, normals)

    def cast_orthographic(self, direction: np.ndarray, cells: int) -> np.ndarray:
        """(n, 3) mesh points visible from far along unit `direction` (mesh frame, pointing from
        the mesh towards the viewer), on a cells × cells grid of parallel rays."""
        import open3d as o3d

        d = np.asarray(direction, dtype=np.float64)
        a, b = perpendicular_basis(d)
        span = np.linspace(-self.radius, self.radius, cells)
        gu, gv = np.meshgrid(span, span)
        origins = self.center + 2.0 * self.radius * d + gu.reshape(-1, 1) * a + gv.reshape(-1, 1) * b
        rays = np.concatenate([origins, np.broadcast_to(-d, origins.shape)], axis=1).astype(np.float32)
        t_hit = self.scene.cast_rays(o3d.core.Tensor(rays))["t_hit"].numpy().astype(np.float64)
        hit = np.isfinite(t_hit)
        return origins[hit] - d * t_hit[hit, None]


def perpendicular_basis(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors that complete unit `d` to a right-handed orthonormal basis (a, b, d)."""
    helper = np.array([1.0, 0.0, 0.0]) if abs(d[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    a = np.cross(helper, d)
    a /= np.linalg.norm(a)
    return a, np.cross(d, a)


def _surface_samples(vertices: np.ndarray, faces: np.ndarray, count: int, seed: int) -> np.ndarray:
    """(count, 3) points spread over the surface by area (seeded: same mesh, same points)."""
    rng = np.random.default_rng(seed)
    tri = vertices[faces]
    area = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    face = rng.choice(len(faces), size=count, p=area / area.sum())
    r1, r2 = rng.random((2, count))
    flip = r1 + r2 > 1
    r1, r2 = np.where(flip, 1 - r1, r1), np.where(flip, 1 - r2, r2)
    t = tri[face]
    return t[:, 0] + r1[:, None] * (t[:, 1] - t[:, 0]) + r2[:, None] * (t[:, 2] - t[:, 0])


class _ClosestGrid:
    """Closest surface sample of every cell centre of a cube grid, so that ICP's correspondence
    search over a few hundred hypotheses at once is an array lookup instead of a tree query."""

    def __init__(
        self, surface: np.ndarray, tree: cKDTree, centre: np.ndarray, half: float, cells: int
    ) -> None:
        self.lo = centre - half
        self.cell = 2.0 * half / cells
        self.cells = cells
        axis = self.lo[None] + (np.arange(cells)[:, None] + 0.5) * self.cell
        grid = np.stack(np.meshgrid(axis[:, 0], axis[:, 1], axis[:, 2], indexing="ij"), axis=-1)
        _, self.index = tree.query(grid.reshape(-1, 3), workers=-1)
        self.surface = surface

    def __call__(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ijk = np.floor((points - self.lo) / self.cell).astype(np.int64)
        inside = ((ijk >= 0) & (ijk < self.cells)).all(axis=-1)
        ijk = np.clip(ijk, 0, self.cells - 1)
        flat = (ijk[..., 0] * self.cells + ijk[..., 1]) * self.cells + ijk[..., 2]
        return self.surface[self.index[flat]], inside
