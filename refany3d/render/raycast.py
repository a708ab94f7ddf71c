"""Exact masks, depth and point maps by ray casting (Open3D `RaycastingScene`), without any GL.

Convention: OpenCV camera (x right, y down, z forward), object-to-camera (4, 4) poses, intrinsics
in pixels with pixel (i, j) centred at u=i, v=j. One ray per pixel centre.
"""

from __future__ import annotations

import numpy as np
import trimesh

from refany3d.render.cameras import invert_pose, pixel_rays


class RaycastMesh:
    """A mesh's ray-casting acceleration structure, built once and cast from many poses."""

    def __init__(self, mesh: trimesh.Trimesh) -> None:
        import open3d as o3d

        self.scene = o3d.t.geometry.RaycastingScene()
        self.scene.add_triangles(
            np.ascontiguousarray(mesh.vertices, dtype=np.float32),
            np.ascontiguousarray(mesh.faces, dtype=np.uint32),
        )


def raycast_maps(
    mesh: trimesh.Trimesh | RaycastMesh,
    pose: np.ndarray,
    intrinsics: np.ndarray,
    width: int,
    height: int,
) -> dict[str, np.ndarray]:
    """Cast one ray per pixel at `mesh` seen at `pose` with `intrinsics`.

    Returns `mask` (H, W) bool, `depth` (H, W) float32 z-depth (0 where empty), `xyz_camera`
    (H, W, 3) float32 camera-frame points and `xyz_canonical` (H, W, 3) float32 object-frame points
    (both 0 where empty), and `face` (H, W) int64 hit triangle (-1 where empty).
    """
    import open3d as o3d

    caster = mesh if isinstance(mesh, RaycastMesh) else RaycastMesh(mesh)
    rays_cam = pixel_rays(intrinsics, width, height)  # z = 1: the hit distance is the z-depth
    cam_to_obj = invert_pose(np.asarray(pose, dtype=np.float64))
    dirs = rays_cam @ cam_to_obj[:3, :3].T
    origins = np.broadcast_to(cam_to_obj[:3, 3], dirs.shape)
    rays = np.concatenate([origins, dirs], axis=-1).astype(np.float32)
    hits = caster.scene.cast_rays(o3d.core.Tensor(rays))
    t = hits["t_hit"].numpy()
    mask = np.isfinite(t)
    depth = np.where(mask, t, 0.0).astype(np.float32)
    xyz_camera = (rays_cam * depth[..., None]).astype(np.float32)
    xyz_canonical = np.where(mask[..., None], origins + dirs * depth[..., None], 0.0).astype(np.float32)
    face = np.where(mask, hits["primitive_ids"].numpy().astype(np.int64), -1)
    return {
        "mask": mask,
        "depth": depth,
        "xyz_camera": xyz_camera,
        "xyz_canonical": xyz_canonical,
        "face": face,
    }
