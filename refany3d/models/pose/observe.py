"""What the pose estimator sees of one view: the masked depth as a point cloud, the mask's signed
distance field, and the pixel sets that render-and-compare casts rays through.

Convention: OpenCV camera (x right, y down, z forward), pixel (u, v) centred at integer coordinates,
depth is z-depth in metres (0 = unknown). Pixel coordinates are (u, v) = (column, row) of the
full view everywhere, so rays through them use the view's own K.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


class NoObservation(ValueError):
    """The mask and depth hold too little of the object to estimate a pose from."""


@dataclass(frozen=True)
class Observation:
    """One view prepared for pose estimation.

        intrinsics: (3, 3) float64 K. cloud: (n, 3) float64 camera-frame points back-projected from the
        eroded mask's valid depth (flying pixels at the edge left out). sdf: (H, W) float32 signed
        distance in px to the mask boundary (negative inside, 0 on the boundary) and sdf_grad (2, H, W)
        its (d/du, d/dv). grid_uv: (m, 2) float64 pixels of a coarse grid over the mask's box (depth
        comparison, ranking); grid_mask (m,) bool mask at them, grid_depth (m,) float64 depth at them
        (0 = unknown or outside the eroded mask). band_uv: (b, 2) float64 every pixel within `band_px`
        of the mask boundary (silhouette comparison at full resolution). step: grid stride in px. depth_noise: robust std
    of the per-pixel depth noise in metres (from neighbouring pixels inside the eroded mask).
    """

    intrinsics: np.ndarray
    mask: np.ndarray
    cloud: np.ndarray
    sdf: np.ndarray
    sdf_grad: np.ndarray
    grid_uv: np.ndarray
    grid_mask: np.ndarray
    grid_depth: np.ndarray
    band_uv: np.ndarray
    step: int
    depth_noise: float

    @property
    def depth_median(self) -> float:
        return float(np.median(self.cloud[:, 2]))

    @property
    def radius_px(self) -> float:
        """Radius in px of a disc with the mask's area (the object's size on the image)."""
        return float(np.sqrt(self.mask.sum() / np.pi))


def observe(
    depth: np.ndarray,
    mask: np.ndarray,
    intrinsics: np.ndarray,
    *,
    erosion_px: int = 3,
    grid_cells: int = 48,
    band_px: float = 10.0,
    max_points: int = 1500,
) -> Observation:
    """Prepare a view: `depth` (H, W) float z-depth in metres, `mask` (H, W) bool, `intrinsics`
    (3, 3) OpenCV K. `erosion_px`: mask erosion before back-projection (edge pixels carry flying
    depth and segmentation errors); `grid_cells`: grid samples along the box's longer side;
    `band_px`: half-width of the boundary band; `max_points`: cloud size cap (even subsample).
    Raises NoObservation when the mask has no valid depth."""
    mask = np.asarray(mask, dtype=bool)
    depth = np.nan_to_num(np.asarray(depth, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    k = np.asarray(intrinsics, dtype=np.float64).reshape(3, 3)
    if mask.shape != depth.shape:
        raise ValueError(f"mask {mask.shape} and depth {depth.shape} differ in shape")
    if mask.sum() < 16:
        raise NoObservation(f"mask has {int(mask.sum())} pixels")
    mask = depth_silhouette(mask, depth)
    interior = interior_mask(mask, depth, erosion_px, float(k[0, 0]))
    vs, us = np.nonzero(interior)
    if us.size < 16:
        raise NoObservation(f"{us.size} mask pixels with valid depth")
    keep = np.linspace(0, us.size - 1, min(us.size, max_points)).astype(np.int64)
    cloud = _backproject(us[keep], vs[keep], depth[vs[keep], us[keep]], k)
    sdf = _signed_distance(mask)
    grad_v, grad_u = np.gradient(sdf)
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    step = max(1, int(np.ceil(max(x1 - x0, y1 - y0) / grid_cells)))
    pad = 2 * step + int(band_px)
    gu, gv = np.meshgrid(
        np.arange(max(0, x0 - pad), min(mask.shape[1], x1 + pad + 1), step),
        np.arange(max(0, y0 - pad), min(mask.shape[0], y1 + pad + 1), step),
    )
    gu, gv = gu.ravel(), gv.ravel()
    bv, bu = np.nonzero(np.abs(sdf) < band_px)
    return Observation(
        intrinsics=k,
        mask=mask,
        cloud=cloud,
        sdf=sdf,
        sdf_grad=np.stack([grad_u, grad_v]).astype(np.float32),
        grid_uv=np.stack([gu, gv], axis=1).astype(np.float64),
        grid_mask=mask[gv, gu],
        grid_depth=np.where((interior & ~depth_edges(depth))[gv, gu], depth[gv, gu], 0.0),
        band_uv=np.stack([bu, bv], axis=1).astype(np.float64),
        step=step,
        depth_noise=depth_noise_std(depth, interior),
    )


# Depth silhouette (`depth_silhouette`): how far from the segmenter's outline the object's edge may
# lie (its bias, wobble and bleed together), the reach of the local depth estimates, and the least
# depth step that counts as an edge (fraction of the depth; a few σ of a network's per-pixel noise).
SILHOUETTE_BAND_PX = 7
SILHOUETTE_SIGMA_PX = 8.0
SILHOUETTE_MIN_STEP = 0.06


def depth_silhouette(mask: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """(H, W) bool: the segmenter's `mask` with its outline moved to the depth edge, where the
    depth shows one. A segmenter grows or shrinks a mask by a px or two and bleeds onto a shadow
    or a touching surface; the outline then reads as a wrong scale. Where the backdrop lies well
    behind the object, the depth itself says where the object ends: within
    `SILHOUETTE_BAND_PX` of the outline, a pixel is the object's when its depth lies nearer the
    object's local depth (spread from the mask's interior) than the backdrop's (spread from
    outside the band) — the middle of a network's smear across the edge (flying pixels) is the
    edge. Where the two depths differ by less than `SILHOUETTE_MIN_STEP` (an object on a table at
    the contact, no depth, a thin part with no interior), the mask stands."""
    valid = depth > 1e-3
    band = SILHOUETTE_BAND_PX
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * band + 1, 2 * band + 1))
    m = mask.astype(np.uint8)
    grown, shrunk = cv2.dilate(m, disc).astype(bool), cv2.erode(m, disc).astype(bool)
    back = _spread(depth, valid & ~cv2.dilate(m, disc, iterations=2).astype(bool), SILHOUETTE_SIGMA_PX)
    # the object's own depth: mask pixels off any depth edge, less what lies at the backdrop's depth
    # (a bleed), spread only a few px (a thin part's depth is its own, not its body's)
    near = depth < (1.0 - SILHOUETTE_MIN_STEP) * np.nan_to_num(back, nan=np.inf)
    core = mask & valid & ~depth_edges(depth) & near
    front = _spread(depth, core, SILHOUETTE_SIGMA_PX / 2)
    step = back - front
    decided = grown & ~shrunk & valid & (step > SILHOUETTE_MIN_STEP * front)
    out = mask.copy()
    out[decided] = depth[decided] < 0.5 * (front[decided] + back[decided])
    return out


def _spread(depth: np.ndarray, where: np.ndarray, sigma_px: float) -> np.ndarray:
    """(H, W) depth of the pixels `where`, spread into their neighbourhood by a normalised
    Gaussian of `sigma_px` (NaN where none is within about 3 σ)."""
    weight = cv2.GaussianBlur(where.astype(np.float32), (0, 0), sigma_px)
    total = cv2.GaussianBlur(np.where(where, depth, 0.0).astype(np.float32), (0, 0), sigma_px)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight > 1e-3, total / weight, np.nan).astype(np.float64)


def interior_mask(mask: np.ndarray, depth: np.ndarray, erosion_px: int, focal: float = 0.0) -> np.ndarray:
    """(H, W) bool: eroded mask with valid depth, minus depth far outside the object's range
    (background seen through a too-large mask, flying pixels). The range allowed around the
    median reaches as deep as the mask is wide in metres (`focal` px; 0 = no size bound), since
    an object seen end-on is deeper than it is wide."""
    radius = int(erosion_px)
    eroded = mask
    while radius > 0:  # small objects keep what they have rather than vanish
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        eroded = cv2.erode(mask.astype(np.uint8), kernel).astype(bool)
        if eroded.sum() >= 0.25 * mask.sum():
            break
        radius -= 1
    eroded = eroded & (depth > 1e-3)  # < 1 mm is "unknown" for every depth source we read
    values = depth[eroded]
    if values.size == 0:
        return eroded
    lo, med, hi = np.percentile(values, [10, 50, 90])
    ys, xs = np.nonzero(mask)
    width = max(np.ptp(xs), np.ptp(ys)) * med / focal if focal > 0 else 0.0
    reach = max(hi - lo, width, 0.01 * med)
    return eroded & (depth > lo - reach) & (depth < hi + reach)


def depth_edges(depth: np.ndarray, window: int = 7, jump: float = 0.08) -> np.ndarray:
    """(H, W) bool: pixels within `window` // 2 px of a depth discontinuity, where the depth of a
    5 × 5 median-filtered view spans more than `jump` of its value: where a network smears the
    object into the backdrop (flying pixels). A surface seen at a grazing angle spans less."""
    smooth = cv2.medianBlur(depth.astype(np.float32), 5)
    kernel = np.ones((window, window), np.uint8)
    span = cv2.dilate(smooth, kernel) - cv2.erode(smooth, kernel)
    return span > jump * np.maximum(smooth, 1e-6)


def depth_noise_std(depth: np.ndarray, interior: np.ndarray) -> float:
    """Robust per-pixel depth noise std (metres): MAD of horizontal neighbour differences, which
    surface slope barely inflates at one pixel's distance."""
    both = interior[:, 1:] & interior[:, :-1]
    diff = (depth[:, 1:] - depth[:, :-1])[both]
    if diff.size < 8:
        return 0.0
    return float(1.4826 * np.median(np.abs(diff - np.median(diff))) / np.sqrt(2.0))


def _backproject(u: np.ndarray, v: np.ndarray, z: np.ndarray, k: np.ndarray) -> np.ndarray:
    """(n, 3) camera-frame points of pixels (u, v) at z-depth z."""
    x = (u - k[0, 2]) / k[0, 0]
    y = (v - k[1, 2]) / k[1, 1]
    return np.stack([x * z, y * z, z], axis=1)


def _signed_distance(mask: np.ndarray) -> np.ndarray:
    """(H, W) float32 distance in px to the mask boundary, negative inside, 0 half-way between
    the last pixel inside and the first outside."""
    m = mask.astype(np.uint8)
    inside = cv2.distanceTransform(m, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    outside = cv2.distanceTransform(1 - m, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return np.where(mask, 0.5 - inside, outside - 0.5).astype(np.float32)


def pixel_rays(uv: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    """(n, 3) float64 camera-frame rays K⁻¹ [u, v, 1] (z = 1, so a hit distance is a z-depth)."""
    k = np.asarray(intrinsics, dtype=np.float64)
    return np.stack(
        [(uv[:, 0] - k[0, 2]) / k[0, 0], (uv[:, 1] - k[1, 2]) / k[1, 1], np.ones(len(uv))], axis=1
    )


def sample_bilinear(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """(n,) values of (H, W) `image` at (n, 2) float pixel coordinates (clamped to the image)."""
    h, w = image.shape
    u = np.clip(uv[:, 0], 0, w - 1.001)
    v = np.clip(uv[:, 1], 0, h - 1.001)
    u0, v0 = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    du, dv = u - u0, v - v0
    top = image[v0, u0] * (1 - du) + image[v0, u0 + 1] * du
    bottom = image[v0 + 1, u0] * (1 - du) + image[v0 + 1, u0 + 1] * du
    return top * (1 - dv) + bottom * dv
