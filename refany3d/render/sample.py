"""All of one sample's renders on one uploaded mesh, in as few GL passes as possible.

A sample needs: the scene point map and object mask at the estimated pose (verification IoU), the
object's RGB at that pose (verification LPIPS), and N orbit views of RGB + canonical point map.
`render_sample` draws each view ONCE, without multisampling, so that colour and depth come from
the same pass, sampled at pixel centres (the same geometry the ray caster gives). All views go
into tiles of one framebuffer (an atlas) that is read back once, so the GPU runs the passes back
to back and the host waits once per sample, not once per view. Mask (depth > 0) and canonical
point map are derived from that depth on the host (whole-array float32 arithmetic, which runs
without the GIL), one view per worker thread. Backgrounds are cleared in GL (white for orbit views), so no compositing
on the host. With `antialias` set, colour comes from a 4x-multisampled pass (edges blended with
the background in GL) and geometry from a second, depth-only single-sample pass (exact depth
still), one read-back per pass.

Camera convention: OpenCV (x right, y down, z forward), object-to-camera (4, 4) poses of the
given mesh, intrinsics in pixels with pixel (i, j) centred at u=i, v=j (`refany3d.render.cameras`).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
import trimesh

from refany3d.config import RenderSettings
from refany3d.render.cameras import intrinsics_from_fov, invert_pose
from refany3d.render.mesh import normalize_transform
from refany3d.render.orbit import orbit_poses
from refany3d.render.renderer import GL_LOCK, MeshScene, Mode, window_depth_to_z


@dataclass(frozen=True)
class SampleRenders:
    """One sample's renders. At the estimated pose (H×W of the given intrinsics):
    scene_point_map (H, W, 3) float32 canonical (object-frame) XYZ, 0 off the object;
    scene_mask (H, W) bool; scene_depth (H, W) float32 z-depth, 0 off the object;
    object_rgb (H, W, 3) uint8 unlit (albedo) object on black; object_mask (H, W) bool (the
    scene mask: both come from one exact pass). Orbit views (R×R, R = settings.resolution):
    orbit_rgb list of (R, R, 3) uint8 on white; orbit_point_maps list of (R, R, 3) float32
    canonical XYZ (0 off the object); orbit_masks list of (R, R) bool; orbit_poses list of
    (4, 4) object-to-camera; orbit_intrinsics (3, 3)."""

    scene_point_map: np.ndarray
    scene_mask: np.ndarray
    scene_depth: np.ndarray
    object_rgb: np.ndarray
    object_mask: np.ndarray
    orbit_rgb: list[np.ndarray]
    orbit_point_maps: list[np.ndarray]
    orbit_masks: list[np.ndarray]
    orbit_poses: list[np.ndarray]
    orbit_intrinsics: np.ndarray


def render_sample(
    mesh: trimesh.Trimesh,
    pose: np.ndarray,
    intrinsics: np.ndarray,
    width: int,
    height: int,
    settings: RenderSettings,
    scene: MeshScene | None = None,
) -> SampleRenders:
    """All renders of one sample: `mesh` (its own frame, y up) at `pose` (4, 4 object-to-camera)
    with `intrinsics` (3, 3, px) in a `width`×`height` image, and `settings.views` orbit views
    (`settings.orbit_shading`: unlit albedo or lit). The mesh is uploaded once (or pass `scene`,
    a `MeshScene` of it).

    Passes: 1 + views (2 + 2 × views with `settings.antialias`)."""
    lit = settings.orbit_shading == "lit"
    # Unlit passes need no normals: indexed vertices, nothing to compute, less to upload.
    scene = scene or MeshScene(mesh, normals="face" if lit else "none")
    to_unit = normalize_transform(mesh)  # orbit around the [-1, 1] box: a rigid orbit of 1/scale
    scale, center = to_unit[0, 0], -to_unit[:3, 3] / to_unit[0, 0]
    size = settings.resolution
    k_orbit = intrinsics_from_fov(settings.fov_deg, size, size)
    poses = orbit_poses(settings.views, settings.elevation_deg, settings.distance / scale, center)
    views = [(pose, intrinsics, width, height, "albedo", (0.0, 0.0, 0.0))]
    views += [(p, k_orbit, size, size, "lit" if lit else "albedo", (1.0, 1.0, 1.0)) for p in poses]
    if settings.antialias:
        drawn = [_views_one_by_one(scene, *view) for view in views]
    else:
        drawn = _views_in_atlas(scene, views)
    (z, object_rgb, mask, scene_map), *orbit = drawn
    return SampleRenders(
        scene_point_map=scene_map,
        scene_mask=mask,
        scene_depth=z,
        object_rgb=object_rgb,
        object_mask=mask,
        orbit_rgb=[view[1] for view in orbit],
        orbit_point_maps=[view[3] for view in orbit],
        orbit_masks=[view[2] for view in orbit],
        orbit_poses=poses,
        orbit_intrinsics=k_orbit,
    )


@functools.lru_cache(maxsize=1)
def _host_pool() -> ThreadPoolExecutor:
    # numpy releases the GIL on whole-array work, so a sample's views post-process side by side
    return ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1), thread_name_prefix="render-host")


def _finish_view(
    rgba: np.ndarray, depth: np.ndarray, near: float, far: float, k: np.ndarray, pose: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw read-back (rows bottom-up; window depth, 1 = empty) → (z-depth, RGB, mask, canonical
    point map), rows top-down. Whole-array float32 arithmetic: numpy drops the GIL for it, so the
    views of a sample finish side by side on the host pool (masked fancy indexing would not)."""
    height, width = depth.shape
    z = window_depth_to_z(depth[::-1], near, far)
    mask = z > 0
    cam_to_obj = invert_pose(np.asarray(pose, dtype=np.float64))
    # the object-frame ray through pixel (u, v) is M [u, v, 1], M = R_cam→obj K⁻¹
    m = cam_to_obj[:3, :3] @ np.linalg.inv(np.asarray(k, dtype=np.float64))
    u, v = np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
    points = np.empty((height, width, 3), np.float32)
    for c in range(3):
        coord = (np.float32(m[c, 1]) * v + np.float32(m[c, 2]))[:, None] + np.float32(m[c, 0]) * u
        coord *= z
        coord += np.float32(cam_to_obj[c, 3]) * mask
        points[..., c] = coord
    rgb = cv2.flip(cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB), 0)  # 10x numpy's strided copy
    return z, rgb, mask, points


def _views_in_atlas(scene: MeshScene, views: list[tuple]) -> list[tuple]:
    """Draw the first view (any size) at the atlas origin and the others (all S×S) in a grid of
    up to 4 columns to its right, read everything back once, finish the views on worker threads."""
    width, height = views[0][2], views[0][3]
    size = views[1][2] if len(views) > 1 else 0
    cols = min(len(views) - 1, 4)
    rows = -(-(len(views) - 1) // max(cols, 1))
    atlas = (width + cols * size, max(height, rows * size))
    tiles = [(0, 0)] + [(width + (i % cols) * size, (i // cols) * size) for i in range(len(views) - 1)]
    with GL_LOCK:  # the atlas and its read-back buffers are the process's: no other pass in between
        planes = [
            scene.draw_tile(p, k, w, h, atlas, tile, mode, bg)
            for (p, k, w, h, mode, bg), tile in zip(views, tiles)
        ]
        rgba, depth = scene.read_atlas(*atlas)
        jobs = [
            _host_pool().submit(
                _finish_view, rgba[y : y + h, x : x + w], depth[y : y + h, x : x + w], near, far, k, p
            )
            for (p, k, w, h, _, _), (x, y), (near, far) in zip(views, tiles, planes, strict=True)
        ]
        return [job.result() for job in jobs]


def _views_one_by_one(
    scene: MeshScene,
    pose: np.ndarray,
    k: np.ndarray,
    width: int,
    height: int,
    mode: Mode,
    background: tuple[float, float, float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Antialiased view: colour from a 4x-multisampled pass, exact geometry from a single-sample
    depth-only pass; (z-depth, RGB, mask, canonical point map), rows top-down."""
    with GL_LOCK:  # the read-back buffers are reused by the next pass, whichever thread makes it
        rgba, _, _, _ = scene.render_raw(pose, k, width, height, mode, False, background)
        rgba = rgba.copy()
        _, depth, near, far = scene.render_raw(pose, k, width, height, "geometry")
        return _finish_view(rgba, depth, near, far, k, pose)
