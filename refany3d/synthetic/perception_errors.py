"""How the perception networks err on a view, as functions over exact ground truth: the `truth`
depth and segmenter backends and the pose cases all draw their errors from here (DESIGN §4: a
fixture easier than reality gives numbers that are not the product's).

Depth (what a monocular metric network such as Depth Pro gives):
- the whole frame has depth: a backdrop (a tilted floor or wall plane) behind the object;
- flying pixels: across the silhouette the depth is smeared between object and backdrop;
- a smooth low-frequency relative error over the image, a global scale error, per-pixel noise.

Masks (what SAM gives from a box): the boundary wobbles along a smooth field, the whole mask is
grown or shrunk by a few px, its edge is ragged, and on one stretch of the boundary it bleeds onto
the background (a shadow, a touching surface), so that backdrop depth lies inside the mask.

Conventions: (H, W) arrays of the view; depth is z-depth in metres, 0 = unknown; masks are bool.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from refany3d.config import DepthSettings, SegmenterSettings


@dataclass(frozen=True)
class DepthErrors:
    """scale: std of the global log-scale error; low_frequency: std of the smooth log-error field
    over the image (zero mean over the frame); noise: relative per-pixel std; flying_px: width in
    px of the smear across the silhouette (0: none); backdrop: the backdrop's depth range as
    multiples of the object's farthest depth (None: no backdrop, depth 0 off the object)."""

    scale: float
    low_frequency: float
    noise: float
    flying_px: int
    backdrop: tuple[float, float] | None

    @classmethod
    def of(cls, options: DepthSettings) -> DepthErrors:
        """The `truth` depth backend's errors (`depth.truth_*`)."""
        near, far = options.truth_backdrop_min, max(options.truth_backdrop_min, options.truth_backdrop_max)
        return cls(
            scale=options.truth_scale_error,
            low_frequency=options.truth_low_frequency,
            noise=options.truth_noise,
            flying_px=options.truth_flying_px,
            backdrop=(near, far) if near > 0 else None,
        )


@dataclass(frozen=True)
class MaskErrors:
    """wobble_px: amplitude of the smooth boundary shift; bias_px: the whole mask grown or shrunk
    by a uniform draw in [-bias_px, bias_px]; ragged_px: amplitude of the pixel-scale edge noise;
    bleed_px: how far the mask bleeds onto the background on one stretch of `bleed_arc` of the
    boundary (a fraction of the object's radius around one boundary point)."""

    wobble_px: float
    bias_px: float
    ragged_px: float
    bleed_px: float
    bleed_arc: float

    @classmethod
    def of(cls, options: SegmenterSettings) -> MaskErrors:
        """The `truth` segmenter's errors (`segmenter.truth_*`)."""
        return cls(
            wobble_px=options.truth_wobble_px,
            bias_px=options.truth_bias_px,
            ragged_px=options.truth_ragged_px,
            bleed_px=options.truth_bleed_px,
            bleed_arc=options.truth_bleed_arc,
        )


@dataclass(frozen=True)
class ErredDepth:
    """depth: (H, W) float32 metres; scale: the global factor drawn; local_scale: that factor
    times the low-frequency field's mean over the object (what an estimator can at best recover:
    the scene that explains the view is the true one scaled by it)."""

    depth: np.ndarray
    scale: float
    local_scale: float


def erred_depth(
    depth: np.ndarray, mask: np.ndarray, errors: DepthErrors, rng: np.random.Generator
) -> ErredDepth:
    """Exact z-depth (H, W) of the object (0 off it) and its exact silhouette (H, W) bool → the
    depth a metric depth network would give of the same view."""
    truth = np.asarray(depth, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool) & (truth > 0)
    seen = truth.copy()
    if errors.backdrop is not None and mask.any():
        seen = np.where(
            mask, truth, backdrop_depth(float(truth[mask].max()), mask.shape, errors.backdrop, rng)
        )
        seen = flying_pixels(seen, mask, errors.flying_px)
    scale = float(np.exp(rng.normal(0.0, errors.scale)))
    field = np.exp(errors.low_frequency * smooth_field(mask.shape, max(mask.shape) / 3.0, rng))
    noise = 1.0 + rng.normal(0.0, errors.noise, mask.shape)
    out = seen * scale * field * noise
    out[seen <= 0] = 0.0
    local = float(np.exp(np.log(field[mask]).mean())) if mask.any() else 1.0
    return ErredDepth(out.astype(np.float32), scale, scale * local)


def backdrop_depth(
    object_far: float, shape: tuple[int, int], multiples: tuple[float, float], rng: np.random.Generator
) -> np.ndarray:
    """(H, W) float64 depth of a plane behind the object, tilted like a floor or a wall seen at an
    angle: its centre at a random multiple of `object_far` in `multiples`."""
    far = object_far * rng.uniform(*multiples)
    v, u = np.mgrid[0 : shape[0], 0 : shape[1]] / max(shape)
    tilt_v, tilt_u = rng.uniform(-0.3, 0.3), rng.uniform(-0.15, 0.15)
    return far * (1.0 + tilt_v * (v - 0.5) + tilt_u * (u - 0.5))


def flying_pixels(depth: np.ndarray, mask: np.ndarray, width: int) -> np.ndarray:
    """(H, W) depth with the pixels within `width` px of the silhouette (both sides) replaced by a
    blend of object and backdrop depth, as networks smooth across a depth edge."""
    if width <= 0:
        return depth
    m = mask.astype(np.uint8)
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    edge = (cv2.dilate(m, kernel) - cv2.erode(m, kernel)).astype(bool)
    blurred = cv2.blur(depth, (2 * width + 1, 2 * width + 1))
    return np.where(edge, blurred, depth)


def smooth_field(shape: tuple[int, int], sigma_px: float, rng: np.random.Generator) -> np.ndarray:
    """(H, W) float64 Gaussian-smoothed noise scaled to zero mean and unit std."""
    small = max(1, int(round(sigma_px / 4)))  # blur a subsampled grid: same field, far cheaper
    h, w = (shape[0] + small - 1) // small, (shape[1] + small - 1) // small
    noise = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), sigma_px / small)
    field = cv2.resize(noise, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR).astype(np.float64)
    return (field - field.mean()) / max(float(field.std()), 1e-9)


def erred_mask(mask: np.ndarray, errors: MaskErrors, rng: np.random.Generator) -> np.ndarray:
    """(H, W) bool: exact silhouette `mask` with a segmenter's boundary errors (see module doc)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any() or mask.all():
        return mask.copy()
    m = mask.astype(np.uint8)
    signed = cv2.distanceTransform(m, cv2.DIST_L2, 3) - cv2.distanceTransform(1 - m, cv2.DIST_L2, 3)
    level = signed + rng.uniform(-errors.bias_px, errors.bias_px)
    if errors.wobble_px > 0:
        level += (
            np.clip(0.5 * smooth_field(mask.shape, 4.0 * max(errors.wobble_px, 1.0), rng), -1, 1)
            * errors.wobble_px
        )
    if errors.ragged_px > 0:
        level += np.clip(0.5 * smooth_field(mask.shape, 1.0, rng), -1, 1) * errors.ragged_px
    if errors.bleed_px > 0:
        level += errors.bleed_px * _bleed_weight(mask, errors.bleed_arc, rng)
    return level > 0


def _bleed_weight(mask: np.ndarray, arc: float, rng: np.random.Generator) -> np.ndarray:
    """(H, W) float64 in [0, 1]: 1 near one random boundary point, falling to 0 at `arc` × the
    object's radius from it (where the bleed reaches its full width)."""
    edge = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    vs, us = np.nonzero(edge)
    pick = int(rng.integers(len(us)))
    reach = max(arc * np.sqrt(mask.sum() / np.pi), 2.0)
    v, u = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
    distance = np.hypot(u - us[pick], v - vs[pick])
    return np.clip(1.5 - 1.5 * distance / reach, 0.0, 1.0)
