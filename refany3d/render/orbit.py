"""Orbit views: N renders at equal azimuth steps around the object's up axis (+y), each with a
pixel-aligned canonical point map; optionally a turntable animation.

The object is normalised to [-1, 1] (bounding box centred, largest half-extent 1) for the
cameras; point maps are returned in the mesh's own frame, so they encode with the same box as
the scene point map. Camera convention: OpenCV, object-to-camera poses of the given mesh.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import trimesh
from PIL import Image

from refany3d.render.cameras import intrinsics_from_fov, look_at
from refany3d.render.mesh import normalize_transform
from refany3d.render.point_maps import normalize_point_map, point_map_from_depth
from refany3d.render.renderer import DEFAULT_AMBIENT, DEFAULT_LIGHTS, MeshScene, Mode


@dataclass(frozen=True)
class OrbitView:
    """rgb (R, R, 3) uint8 on white; point_map (R, R, 3) float32 canonical XYZ (0 off the object);
    mask (R, R) bool; pose (4, 4) object-to-camera of the input mesh; intrinsics (3, 3)."""

    rgb: np.ndarray
    point_map: np.ndarray
    mask: np.ndarray
    pose: np.ndarray
    intrinsics: np.ndarray


def orbit_poses(
    n_views: int,
    elevation_deg: float,
    distance: float,
    center: np.ndarray = (0.0, 0.0, 0.0),
    azimuth0_deg: float = 0.0,
) -> list[np.ndarray]:
    """(4, 4) rigid object-to-camera poses (OpenCV) of cameras on a circle around the +y axis
    through `center` (3,), looking at it: view k at azimuth `azimuth0_deg + 360 k / n_views`
    (0 = on +z, increasing towards +x), `elevation_deg` above the xz plane."""
    el = np.radians(elevation_deg)
    center = np.asarray(center, dtype=np.float64)
    poses = []
    for k in range(n_views):
        az = np.radians(azimuth0_deg + 360.0 * k / n_views)
        eye = distance * np.array([np.cos(el) * np.sin(az), np.sin(el), np.cos(el) * np.cos(az)])
        poses.append(look_at(center + eye, center, (0.0, 1.0, 0.0)))
    return poses


def render_orbit_views(
    mesh: trimesh.Trimesh,
    n_views: int = 8,
    resolution: int = 512,
    elevation_deg: float = 20.0,
    distance: float = 2.8,
    fov_deg: float = 40.0,
    mode: Mode = "lit",
    scene: MeshScene | None = None,
) -> list[OrbitView]:
    """Render `n_views` orbit views of `mesh` (its own frame, y up), each RGB + canonical point map.

    scene: the mesh already uploaded (`MeshScene(mesh)`), to share one upload per sample.
    """
    scene = scene or MeshScene(mesh)
    # Normalising the object to [-1, 1] is the same as scaling the orbit by 1 / scale: the poses
    # stay rigid and depth stays in the mesh's units.
    to_unit = normalize_transform(mesh)
    scale, center = to_unit[0, 0], -to_unit[:3, 3] / to_unit[0, 0]
    k = intrinsics_from_fov(fov_deg, resolution, resolution)
    white = np.full((resolution, resolution, 3), 255, dtype=np.uint8)
    views = []
    for pose in orbit_poses(n_views, elevation_deg, distance / scale, center):
        out = scene.render(pose, k, resolution, resolution, mode, DEFAULT_LIGHTS, DEFAULT_AMBIENT)
        xyz = point_map_from_depth(out.depth, k, pose)
        views.append(OrbitView(out.over(white), xyz, out.mask, pose, k))
    return views


def turntable(
    mesh: trimesh.Trimesh,
    frames: int = 36,
    resolution: int = 256,
    elevation_deg: float = 20.0,
    distance: float = 2.8,
    fov_deg: float = 40.0,
    fps: int = 12,
) -> bytes:
    """Animated WebP bytes: RGB | point map (8-bit encoding) side by side, one full turn."""
    views = render_orbit_views(mesh, frames, resolution, elevation_deg, distance, fov_deg)
    lo, hi = mesh.bounds
    images = []
    for v in views:
        pm = np.round(normalize_point_map(v.point_map, v.mask, lo, hi) * 255).astype(np.uint8)
        images.append(Image.fromarray(np.concatenate([v.rgb, pm], axis=1)))
    buf = io.BytesIO()
    images[0].save(
        buf,
        format="WEBP",
        save_all=True,
        append_images=images[1:],
        duration=1000 // fps,
        loop=0,
        lossless=True,
    )
    return buf.getvalue()
