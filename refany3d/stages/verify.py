"""Verify stage: render the posed textured mesh and keep the samples where it matches the photo.

Four tests, their measures kept on the record (`metrics["mask_iou"]`, `metrics["depth_offset"]`,
`metrics["depth_inliers"]`, `metrics["lpips"]`):
- silhouette: IoU of the rendered mask with the SAM mask must be above `verify.min_iou`;
- ambiguity: the pose estimator's margin over its best different answer (`metrics["pose_margin"]`,
  where the backend reports one) must be at least `verify.min_pose_margin` — a near-symmetric shape
  whose views cannot tell two poses apart is dropped, not guessed (`pose_ambiguous`);
- depth: inside the mask's eroded interior, away from depth edges, the posed mesh's depth must agree
  with the view's: median offset within `verify.max_depth_offset` of the object's size and at least
  `verify.min_depth_inliers` of the pixels within `verify.depth_tolerance` (`depth_mismatch`). A
  silhouette cannot see a flip to a look-alike face or a scale (and distance) off by 5 %; depth can;
- appearance: LPIPS (AlexNet, v0.1 heads) between the rendered object and the photo's object,
  both cut to the same square around the union of the two masks and put on white, must be below
  `verify.max_lpips`. The score is lpips' per-pixel map averaged over the union of the masks:
  the standard score averages over the whole crop, where the shared white background dilutes it
  (measured on synthetic views: a grey or noise texture scored 0.10-0.44 standard, 0.36-0.85
  masked; the true texture 0.02-0.07 standard, 0.04-0.09 masked). LPIPS runs only on samples
  that passed the silhouette test.

The mesh is rendered unlit (its base colour): for real meshes the texture was projected from
this very photo, so shading is already in it.
"""

from __future__ import annotations

import cv2
import numpy as np

from refany3d.config import BuildSettings, VerifySettings
from refany3d.models.perceptual import load_lpips
from refany3d.models.pose.calibrate import similarity
from refany3d.models.pose.consistency import DepthConsistency, depth_consistency
from refany3d.models.pose.model import PoseModel
from refany3d.records import DEPTH, Sample, StageResult
from refany3d.render.renderer import MeshScene
from refany3d.stages._posed import PosedView, missing_inputs, read_posed
from refany3d.stages._views import read_depth, record
from refany3d.stages.context import StageContext

STAGE = "verify"
LOW_IOU = "low_iou"
POSE_AMBIGUOUS = "pose_ambiguous"
DEPTH_MISMATCH = "depth_mismatch"
HIGH_LPIPS = "high_lpips"
MISSING_POSE = "missing_pose"

_WHITE = 255


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 0.0


def _square_window(mask: np.ndarray, margin: float) -> tuple[int, int, int]:
    """(x0, y0, side) of the square around the (H, W) bool `mask`'s box, grown by `margin` of
    its longer side on each end; may reach past the image."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    x0, x1, y0, y1 = cols[0], cols[-1] + 1, rows[0], rows[-1] + 1
    side = int(np.ceil(max(x1 - x0, y1 - y0) * (1.0 + 2.0 * margin)))
    return int((x0 + x1 - side) // 2), int((y0 + y1 - side) // 2), max(side, 1)


def _crop(image: np.ndarray, window: tuple[int, int, int], size: int, fill: int) -> np.ndarray:
    """(size, size, ...) of the square `window` of an (H, W, ...) uint8 `image`, `fill` beyond its edges."""
    x0, y0, side = window
    out = np.full((side, side, *image.shape[2:]), fill, np.uint8)
    h, w = image.shape[:2]
    sx, sy, ex, ey = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
    out[sy - y0 : ey - y0, sx - x0 : ex - x0] = image[sy:ey, sx:ex]
    return cv2.resize(out, (size, size), interpolation=cv2.INTER_AREA)


def _object_crops(
    view: PosedView, rendered: np.ndarray, rendered_mask: np.ndarray, settings: BuildSettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(photo crop, render crop, union mask crop): (S, S, 3) uint8 each with its own object on
    white, and (S, S) bool where either object is."""
    opts = settings.verify
    union = view.mask | rendered_mask
    window = _square_window(union, opts.crop_margin)
    photo = np.where(view.mask[..., None], view.image, np.uint8(_WHITE))
    region = _crop(union.astype(np.uint8) * 255, window, opts.lpips_size, 0) > 127
    return (
        _crop(photo, window, opts.lpips_size, _WHITE),
        _crop(rendered, window, opts.lpips_size, _WHITE),
        region,
    )


def geometric_rejection(
    iou: float, margin: float | None, depth: DepthConsistency, opts: VerifySettings
) -> tuple[str, float, str] | None:
    """(reason, metric, detail) of the first geometric test a posed sample fails, or None: the
    silhouette IoU, the estimator's margin (None: the backend reports none), the depth agreement."""
    if not iou > opts.min_iou:
        return LOW_IOU, iou, f"mask IoU {iou:.3f} <= verify.min_iou {opts.min_iou}"
    if margin is not None and margin < opts.min_pose_margin:
        return (
            POSE_AMBIGUOUS,
            margin,
            f"pose margin {margin:.3f} < verify.min_pose_margin {opts.min_pose_margin}",
        )
    if abs(depth.offset) > opts.max_depth_offset:
        return (
            DEPTH_MISMATCH,
            depth.offset,
            (
                f"median depth offset {depth.offset:+.3f} of the object's size, beyond verify.max_depth_offset "
                f"{opts.max_depth_offset}"
            ),
        )
    if depth.inliers < opts.min_depth_inliers:
        return (
            DEPTH_MISMATCH,
            depth.inliers,
            (
                f"{depth.inliers:.2f} of the interior agrees in depth < verify.min_depth_inliers {opts.min_depth_inliers}"
            ),
        )
    return None


def _verify_one(sample: Sample, settings: BuildSettings, ctx: StageContext, metric) -> Sample | tuple:
    """The kept sample with its metrics, or (reason, metric, detail) of its drop."""
    lacking = missing_inputs(sample) or ("" if DEPTH in sample.artifacts else "artifacts['depth']")
    if lacking:
        return MISSING_POSE, None, f"lacks {lacking}"
    view = read_posed(sample, ctx.store)
    height, width = view.mask.shape
    out = MeshScene(view.mesh, normals="none").render(
        view.pose, view.intrinsics, width, height, mode="albedo", exact=True
    )
    opts = settings.verify
    depth = depth_consistency(
        PoseModel(view.mesh),
        similarity(sample.pose, view.scale),
        read_depth(ctx.store, sample.artifacts[DEPTH]),
        view.mask,
        view.intrinsics,
        tolerance=opts.depth_tolerance,
    )
    kept = sample.replace()
    kept.metrics.update(
        mask_iou=_iou(out.mask, view.mask), depth_offset=depth.offset, depth_inliers=depth.inliers
    )
    rejection = geometric_rejection(kept.metrics["mask_iou"], sample.metrics.get("pose_margin"), depth, opts)
    if rejection is not None:
        return rejection
    white = np.full((height, width, 3), _WHITE, np.uint8)
    photo, rendered, region = _object_crops(view, out.over(white), out.mask, settings)
    kept.metrics["lpips"] = distance = metric.masked_distance(photo, rendered, region)
    if not distance < settings.verify.max_lpips:
        return HIGH_LPIPS, distance, f"LPIPS {distance:.3f} >= verify.max_lpips {settings.verify.max_lpips}"
    return kept


def verify(samples: list[Sample], settings: BuildSettings, ctx: StageContext) -> StageResult:
    """Keep the posed samples whose rendered mesh matches the photo (silhouette, then appearance);
    the LPIPS weights are loaded (or their absence reported) before any sample is read."""
    result = StageResult()
    if not samples:
        return result
    metric = load_lpips(settings)
    record(result, STAGE, None, samples, [_verify_one(s, settings, ctx, metric) for s in samples])
    return result
