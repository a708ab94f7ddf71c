"""Weight-free geometric metrics of one generated sample: do its RGB image and its point map agree
with each other and with the asset?

Inputs are one generated sample: `rgb` (H, W, 3) uint8 and `point_map` (H, W, 3) float in [0, 1],
the model's point-map image (each axis normalised over the asset's bounding box, white
background, DESIGN §5), plus the asset (`trimesh.Trimesh`, in the frame the point map encodes).

The point map's foreground (`point_map_foreground`) is segmented by the same rule as the RGB
silhouette, not by a distance from white: a decoded point map's background is off-white and
speckled, and the encoding itself puts foreground near white (the bounding box's (1, 1, 1) corner:
on the synthetic renders ~15 % of the foreground pixels are within 0.1 of white), so no colour
threshold separates the two. GrabCut, framed by the image border, is then intersected with the
pixels that differ from the border's colour by more than the border's own noise: an exact render
keeps exactly its non-white pixels, and an image without an object has no foreground.

Metrics (each a float; `nan` when the point map has no foreground):
- `silhouette_iou` in [0, 1], higher is better: the point map's foreground against the RGB
  object's silhouette (GrabCut on the RGB, weight-free, seeded with the image border as background).
- `surface_distance` in [0, inf), lower is better (0 = on the surface): mean distance of the
  generated canonical coordinates to the asset's surface, in units of the asset's bounding-box
  diagonal.
- `texture_error` in [0, 1], lower is better: mean absolute difference (per channel, RGB in [0, 1])
  between the asset's texture colour at each generated canonical coordinate (nearest surface point)
  and the generated RGB pixel, over the foreground of both. Shading makes it > 0 for a correct sample.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import trimesh

from refany3d.render.mesh import surface_colors

# The least background noise of a point map: one 8-bit PNG step either way.
QUANTISATION = 2.0 / 255.0
# The share of the border frame's pixels that may be noise beyond the background's own spread.
FRAME_NOISE_QUANTILE = 0.99


@dataclass(frozen=True)
class GeometryMetrics:
    silhouette_iou: float
    surface_distance: float
    texture_error: float

    def as_dict(self) -> dict[str, float]:
        return {
            "silhouette_iou": self.silhouette_iou,
            "surface_distance": self.surface_distance,
            "texture_error": self.texture_error,
        }


def point_map_foreground(point_map: np.ndarray, border: float = 0.02) -> np.ndarray:
    """(H, W) bool object pixels of a (H, W, 3) [0, 1] point-map image (module doc): GrabCut's
    foreground (`rgb_silhouette`, framed by `border`) among the pixels that differ from the
    frame's median colour by more than the frame's noise (its `FRAME_NOISE_QUANTILE` deviation,
    at least `QUANTISATION`), in every channel's largest difference."""
    image = np.clip(np.asarray(point_map, dtype=np.float64), 0.0, 1.0)
    frame = image[_frame_mask(image.shape[:2], border)]
    background = np.median(frame, axis=0)
    noise = max(
        QUANTISATION, float(np.quantile(np.abs(frame - background).max(axis=-1), FRAME_NOISE_QUANTILE))
    )
    differs = np.abs(image - background).max(axis=-1) > noise
    if not differs.any():
        return differs
    return differs & rgb_silhouette(np.round(image * 255.0).astype(np.uint8), border)


def _frame_pixels(shape: tuple[int, int], border: float) -> tuple[int, int]:
    """The border frame's width and height in pixels (at least 1) of an image of `shape` (H, W)."""
    h, w = shape
    return max(1, round(border * w)), max(1, round(border * h))


def _frame_mask(shape: tuple[int, int], border: float) -> np.ndarray:
    """(H, W) bool: the border frame that `rgb_silhouette` takes as background."""
    bx, by = _frame_pixels(shape, border)
    mask = np.ones(shape, bool)
    mask[by : shape[0] - by, bx : shape[1] - bx] = False
    return mask


def decode_canonical(point_map: np.ndarray, bbox_min: np.ndarray, bbox_max: np.ndarray) -> np.ndarray:
    """(H, W, 3) float64 canonical coordinates of a [0, 1] point-map image over the box (each (3,))."""
    lo = np.asarray(bbox_min, dtype=np.float64)
    return lo + np.asarray(point_map, dtype=np.float64) * (np.asarray(bbox_max, dtype=np.float64) - lo)


def rgb_silhouette(rgb: np.ndarray, border: float = 0.02, iterations: int = 5) -> np.ndarray:
    """(H, W) bool object silhouette of a (H, W, 3) uint8 image by GrabCut (OpenCV): a frame of
    `border` x the image size is background, the rest is estimated from the colours. Deterministic:
    see `_on_fresh_rng`."""
    import cv2

    h, w = rgb.shape[:2]
    bx, by = _frame_pixels((h, w), border)
    mask = np.zeros((h, w), np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    rect = (bx, by, w - 2 * bx, h - 2 * by)
    _on_fresh_rng(lambda: cv2.grabCut(bgr, mask, rect, bgd, fgd, iterations, cv2.GC_INIT_WITH_RECT))
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)


def _on_fresh_rng(call) -> None:
    """Run `call` on a thread of its own. GrabCut draws its k-means start from OpenCV's RNG, which
    takes no generator argument and is per thread; a new thread's starts at OpenCV's fixed default
    state (the one `cv2.setRNGSeed(0)` sets), so the result never depends on what the caller's
    thread drew before, and the caller's RNG is left as it was."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(err)

    worker = threading.Thread(target=run, name="grabcut")
    worker.start()
    worker.join()
    if errors:
        raise errors[0]


def silhouette_iou(foreground: np.ndarray, silhouette: np.ndarray) -> float:
    """IoU of two (H, W) bool masks; nan when both are empty."""
    union = np.logical_or(foreground, silhouette).sum()
    return float(np.logical_and(foreground, silhouette).sum() / union) if union else float("nan")


def surface_distance(points: np.ndarray, mesh: trimesh.Trimesh) -> float:
    """Mean unsigned distance of (n, 3) points to `mesh`'s surface / its bounding-box diagonal."""
    import open3d as o3d

    if len(points) == 0:
        return float("nan")
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(
        np.ascontiguousarray(mesh.vertices, dtype=np.float32),
        np.ascontiguousarray(mesh.faces, dtype=np.uint32),
    )
    dist = scene.compute_distance(o3d.core.Tensor(np.asarray(points, dtype=np.float32))).numpy()
    lo, hi = mesh.bounds
    return float(dist.mean() / np.linalg.norm(hi - lo))


def texture_error(points: np.ndarray, colors: np.ndarray, mesh: trimesh.Trimesh) -> float:
    """Mean |asset colour at (n, 3) points - (n, 3) uint8 generated colours|, RGB scaled to [0, 1]."""
    if len(points) == 0:
        return float("nan")
    asset = surface_colors(mesh, points) / 255.0
    return float(np.abs(asset - np.asarray(colors, dtype=np.float64) / 255.0).mean())


def geometry_metrics(
    rgb: np.ndarray,
    point_map: np.ndarray,
    mesh: trimesh.Trimesh,
    silhouette: np.ndarray | None = None,
    foreground: np.ndarray | None = None,
) -> GeometryMetrics:
    """All three metrics of one sample. `silhouette`: the RGB object's (H, W) bool mask when known
    (e.g. from a segmenter); None = `rgb_silhouette`. `foreground`: the point map's, when the
    caller has it; None = `point_map_foreground`."""
    foreground = point_map_foreground(point_map) if foreground is None else foreground
    silhouette = rgb_silhouette(rgb) if silhouette is None else silhouette
    lo, hi = mesh.bounds
    points = decode_canonical(point_map, lo, hi)[foreground]
    both = foreground & silhouette
    return GeometryMetrics(
        silhouette_iou=silhouette_iou(foreground, silhouette),
        surface_distance=surface_distance(points, mesh),
        texture_error=texture_error(decode_canonical(point_map, lo, hi)[both], rgb[both], mesh),
    )
