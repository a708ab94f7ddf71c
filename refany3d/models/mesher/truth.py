"""`truth` mesher: the synthetic view's ground-truth mesh moved into a Hunyuan3D-like canonical frame.

Hunyuan3D's output is seen from the front as in the input image, re-centred and scaled to its box,
and it is a new surface (other vertices, none of the truth's UVs). So: the truth mesh rotated into
the view's camera axes (y up, towards the camera = +z) with a small random rotation error,
normalised into [-1, 1]³, re-meshed as one closed surface the way Hunyuan3D extracts its own
(marching cubes of a signed distance on a grid: new vertices, parts fused, small gaps closed),
untextured. The `projection` texturer then colours it like any generated mesh.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import trimesh
from PIL import Image
from scipy.spatial.transform import Rotation

from refany3d.config import MesherSettings
from refany3d.models._truth import TRUTH_LABEL, read_view_truth, truth_rng
from refany3d.models.mesher.base import MesherTimeout
from refany3d.records import Sample
from refany3d.render.mesh import normalize_mesh, repair_mesh

# OpenCV camera axes (y down, z forward) -> canonical front-view axes (y up, camera on +z).
CAMERA_TO_FRONT = np.diag([1.0, -1.0, -1.0])


def canonical_rotation(pose: np.ndarray, error: np.ndarray) -> np.ndarray:
    """(3, 3) rotation object frame -> canonical frame: the camera's axes of the (4, 4) OpenCV
    object-to-camera `pose`, turned to y up / camera on +z, then by the (3, 3) `error`."""
    return error @ CAMERA_TO_FRONT @ np.asarray(pose, dtype=np.float64)[:3, :3]


def signed_distance(mesh: trimesh.Trimesh, points: np.ndarray) -> np.ndarray:
    """(n,) float32 distance of (n, 3) `points` to `mesh`'s surface, negative inside any of its
    connected parts. Parts are tested one at a time: composites overlap, and a parity test on the
    whole would call the overlap outside."""
    import open3d as o3d

    query = o3d.core.Tensor(points.astype(np.float32))
    whole = o3d.t.geometry.RaycastingScene()
    whole.add_triangles(np.asarray(mesh.vertices, np.float32), np.asarray(mesh.faces, np.uint32))
    inside = np.zeros(len(points), dtype=bool)
    for part in mesh.split(only_watertight=False):
        scene = o3d.t.geometry.RaycastingScene()
        scene.add_triangles(np.asarray(part.vertices, np.float32), np.asarray(part.faces, np.uint32))
        inside |= scene.compute_occupancy(query, nsamples=3).numpy() > 0.5
    distance = whole.compute_distance(query).numpy()
    return np.where(inside, -distance, distance).astype(np.float32)


def remesh(mesh: trimesh.Trimesh, resolution: int) -> trimesh.Trimesh | None:
    """The zero level set of `mesh`'s signed distance on a (resolution + 1)³ grid over its
    bounding box (plus a margin), by marching cubes; None if there is no surface."""
    from skimage import measure

    lo, hi = mesh.bounds
    margin = 2.0 * float((hi - lo).max()) / resolution
    axes = [np.linspace(a - margin, b + margin, resolution + 1) for a, b in zip(lo, hi)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    sdf = signed_distance(mesh, grid.reshape(-1, 3)).reshape(grid.shape[:3])
    if not (sdf.min() < 0.0 < sdf.max()):
        return None
    spacing = tuple(float(a[1] - a[0]) for a in axes)
    vertices, faces, _, _ = measure.marching_cubes(sdf, 0.0, spacing=spacing, method="lewiner")
    return trimesh.Trimesh(vertices + [a[0] for a in axes], faces, process=False)


class TruthMesher:
    name = TRUTH_LABEL

    def __init__(
        self,
        weights: str = "",
        device: str = "cpu",
        dtype: str = "float32",
        *,
        dit: str = "standard",
        flashvdm: bool = False,
        mc_algo: str = "auto",
        compile: bool = False,
    ) -> None:
        del (
            weights,
            device,
            dtype,
            dit,
            flashvdm,
            mc_algo,
            compile,
        )  # no model: ground truth is read per sample

    def generate(
        self,
        images: Sequence[Image.Image],
        samples: Sequence[Sample],
        options: MesherSettings,
        seed: int,
        deadline: float,
    ) -> list[trimesh.Trimesh | None]:
        out = []
        for _image, sample in zip(images, samples, strict=True):
            if time.monotonic() > deadline:
                raise MesherTimeout(
                    f"truth mesher passed its deadline after {len(out)} of {len(samples)}", done=out
                )
            truth = read_view_truth(sample)
            rng = truth_rng(seed, sample, "mesh")
            error = Rotation.from_rotvec(
                np.radians(rng.normal(0.0, options.truth_rotation_deg, 3))
            ).as_matrix()
            geometry = repair_mesh(truth.mesh)  # UV seams merged: one surface per part
            geometry.vertices = geometry.vertices @ canonical_rotation(truth.pose, error).T
            canonical, _ = normalize_mesh(geometry)
            out.append(remesh(canonical, options.truth_resolution))
        return out
