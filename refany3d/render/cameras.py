"""Pinhole cameras, poses and (back-)projection in one convention.

Convention (everywhere in refany3d): OpenCV camera frame — x right, y down, z forward. A pose is
a (4, 4) float64 object-to-camera transform: `p_cam = pose[:3, :3] @ p_obj + pose[:3, 3]`.
Intrinsics K are (3, 3) in pixels; the centre of pixel (column i, row j) is at u=i, v=j, so a
W×W view with a centred principal point has cx = cy = (W - 1) / 2.
"""

from __future__ import annotations

import functools

import numpy as np

# OpenCV camera axes → OpenGL camera axes (y up, z backward): flip y and z.
CV_TO_GL = np.diag([1.0, -1.0, -1.0, 1.0])


def intrinsics_from_focal(focal_px: float, width: int, height: int) -> np.ndarray:
    """(3, 3) float64 K with focal length `focal_px` (square pixels) and a centred principal point."""
    return np.array(
        [[focal_px, 0.0, (width - 1) / 2.0], [0.0, focal_px, (height - 1) / 2.0], [0.0, 0.0, 1.0]]
    )


def intrinsics_from_fov(fov_deg: float, width: int, height: int) -> np.ndarray:
    """(3, 3) float64 K whose vertical field of view (edge to edge of the image) is `fov_deg`."""
    return intrinsics_from_focal(focal_from_fov(fov_deg, height), width, height)


def focal_from_fov(fov_deg: float, size_px: int) -> float:
    """Focal length in px that spans `fov_deg` over `size_px` pixels."""
    return 0.5 * size_px / np.tan(np.radians(fov_deg) / 2.0)


def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray = (0.0, 1.0, 0.0)) -> np.ndarray:
    """(4, 4) object-to-camera pose (OpenCV) of a camera at `eye` looking at `target`.

    `eye`, `target`, `up`: (3,) in the object frame; the image's "up" (−y of the camera) follows `up`.
    """
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)  # right-handed: x = y × z with y = −up projected
    norm = np.linalg.norm(x)
    if norm < 1e-9:
        raise ValueError("look_at: view direction is parallel to `up`")
    x /= norm
    y = np.cross(z, x)
    rot = np.stack([x, y, z])  # rows: camera axes in object coordinates
    pose = np.eye(4)
    pose[:3, :3] = rot
    pose[:3, 3] = -rot @ eye
    return pose


def invert_pose(pose: np.ndarray) -> np.ndarray:
    """Inverse of a rigid (4, 4) transform (camera-to-object for an object-to-camera pose)."""
    inv = np.eye(4)
    inv[:3, :3] = pose[:3, :3].T
    inv[:3, 3] = -pose[:3, :3].T @ pose[:3, 3]
    return inv


def transform_points(points: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Apply a (4, 4) transform to (..., 3) points; returns (..., 3) in the same dtype."""
    pts = np.asarray(points)
    out = pts @ transform[:3, :3].T.astype(pts.dtype) + transform[:3, 3].astype(pts.dtype)
    return out.astype(pts.dtype, copy=False)


def project(points_cam: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    """(n, 3) camera-frame points → (n, 2) pixel coordinates (u, v); points need z > 0."""
    pts = np.asarray(points_cam, dtype=np.float64)
    uvw = pts @ np.asarray(intrinsics, dtype=np.float64).T
    return uvw[:, :2] / uvw[:, 2:3]


def pixel_rays(intrinsics: np.ndarray, width: int, height: int) -> np.ndarray:
    """(height, width, 3) float64 camera-frame rays K⁻¹ [u, v, 1] through pixel centres (z = 1).

    Cached per (K, size): orbit views and renders of one sample share their rays. Read-only."""
    key = tuple(np.asarray(intrinsics, dtype=np.float64).reshape(-1).tolist())
    return _pixel_rays(key, int(width), int(height))


@functools.lru_cache(maxsize=8)
def _pixel_rays(k: tuple[float, ...], width: int, height: int) -> np.ndarray:
    u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    pix = np.stack([u, v, np.ones_like(u)], axis=-1)
    rays = pix @ np.linalg.inv(np.asarray(k).reshape(3, 3)).T
    rays.setflags(write=False)
    return rays


def backproject(depth: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    """(H, W) z-depth → (H, W, 3) float32 camera-frame XYZ; zero where depth is 0."""
    height, width = depth.shape
    rays = pixel_rays(intrinsics, width, height)
    return (rays * depth[..., None]).astype(np.float32)
