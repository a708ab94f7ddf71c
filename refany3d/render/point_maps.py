"""Point maps: canonical object coordinates per pixel, and their encoding (DESIGN §5).

Encoding as the reference implementation does it: each axis of the canonical position is
normalised over the mesh's bounding box to [0, 1]; background pixels are white (1, 1, 1). The
model consumes the 8-bit PNG; the 16-bit PNG beside it keeps the value losslessly enough
(1/65535 of the box) to decode positions back.
"""

from __future__ import annotations

import numpy as np

from refany3d.render.cameras import invert_pose, pixel_rays


def point_map_from_depth(depth: np.ndarray, intrinsics: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """(H, W) z-depth of a render at `pose` (object-to-camera, OpenCV) → (H, W, 3) float32 canonical
    (object-frame) positions, 0 where depth is 0."""
    height, width = depth.shape
    cam_to_obj = invert_pose(np.asarray(pose, dtype=np.float64))
    # rays rotated into the object frame once, then scaled by depth: one small matmul per view
    rays, rot, t = pixel_rays(intrinsics, width, height), cam_to_obj[:3, :3], cam_to_obj[:3, 3]
    # (rays · depth) rotated into the object frame, column by column: avoids a skinny BLAS matmul
    scaled = [rays[..., i] * depth for i in range(3)]
    xyz = np.stack([sum(scaled[i] * rot[c, i] for i in range(3)) + t[c] for c in range(3)], axis=-1)
    xyz = xyz.astype(np.float32)
    xyz[depth <= 0] = 0.0
    return xyz


def normalize_point_map(
    xyz: np.ndarray, mask: np.ndarray, bbox_min: np.ndarray, bbox_max: np.ndarray
) -> np.ndarray:
    """(H, W, 3) canonical positions → (H, W, 3) float32 in [0, 1] per axis over the box
    [bbox_min, bbox_max] (each (3,)); 1 (white) where `mask` (H, W) bool is False."""
    lo = np.asarray(bbox_min, dtype=np.float64)
    span = np.maximum(np.asarray(bbox_max, dtype=np.float64) - lo, 1e-12)
    unit = np.clip((xyz.astype(np.float64) - lo) / span, 0.0, 1.0)
    return np.where(mask[..., None], unit, 1.0).astype(np.float32)


def encode_point_map(
    xyz: np.ndarray, mask: np.ndarray, bbox_min: np.ndarray, bbox_max: np.ndarray
) -> tuple[bytes, bytes]:
    """(8-bit RGB PNG, 16-bit RGB PNG) of a normalised point map (see `normalize_point_map`)."""
    unit = normalize_point_map(xyz, mask, bbox_min, bbox_max)
    png8 = png_bytes(np.round(unit * 255.0).astype(np.uint8))
    png16 = png_bytes(np.round(unit * 65535.0).astype(np.uint16))
    return png8, png16


def point_map_png(xyz: np.ndarray, mask: np.ndarray, bbox_min: np.ndarray, bbox_max: np.ndarray) -> bytes:
    """The 8-bit RGB PNG alone (what the model sees), without the 16-bit twin."""
    return png_bytes(np.round(normalize_point_map(xyz, mask, bbox_min, bbox_max) * 255.0).astype(np.uint8))


def decode_point_map(png: bytes, bbox_min: np.ndarray, bbox_max: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(xyz (H, W, 3) float32 canonical positions, mask (H, W) bool) from an 8- or 16-bit PNG.

    Background is the all-white pixel; xyz is 0 there."""
    import cv2  # late: the renderer runs where OpenCV may be absent

    image = cv2.imdecode(np.frombuffer(png, dtype=np.uint8), cv2.IMREAD_UNCHANGED)[..., ::-1]
    top = 65535.0 if image.dtype == np.uint16 else 255.0
    unit = image.astype(np.float64) / top
    mask = ~(image == top).all(axis=-1)
    lo = np.asarray(bbox_min, dtype=np.float64)
    xyz = lo + unit * (np.asarray(bbox_max, dtype=np.float64) - lo)
    return np.where(mask[..., None], xyz, 0.0).astype(np.float32), mask


def png_bytes(rgb: np.ndarray) -> bytes:
    """PNG of an (H, W, 3) RGB or (H, W) grey uint8/uint16 image (fast zlib level, deterministic)."""
    import cv2  # PIL cannot write 16-bit RGB PNGs

    bgr = rgb[..., ::-1] if rgb.ndim == 3 else rgb
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(bgr), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()
