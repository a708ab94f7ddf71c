"""Depth stage: metric depth of each view and the focal length it implies (monocular depth backend).

Depth is stored as float16 metres in an npz (key `depth`, 0 = unknown); `sample.focal_px` is the
focal length in pixels of the view that goes with it (the pose stage back-projects with it).
"""

from __future__ import annotations

import io
import math

import numpy as np

from refany3d.config import BuildSettings
from refany3d.models.depth import DepthMap, load_depth
from refany3d.records import DEPTH, MASK, Sample, StageResult
from refany3d.render.cameras import intrinsics_from_focal
from refany3d.stages._views import Outcome, batched, parallel_map, pipelined, read_mask, read_views, record
from refany3d.stages.context import StageContext

STAGE = "depth"
INVALID_DEPTH = "invalid_depth"

_FLOAT16_MAX = 65000.0


def _encode_depth(depth: np.ndarray) -> bytes:
    clean = np.where(np.isfinite(depth), depth, 0.0).clip(0.0, _FLOAT16_MAX).astype(np.float16)
    buf = io.BytesIO()
    np.savez(buf, depth=clean)  # float16 noise compresses poorly; zlib would cost ~10 ms a view
    return buf.getvalue()


def _finish(sample: Sample, width: int, dm: DepthMap, ctx: StageContext) -> Outcome:
    """The kept sample with its stored depth and focal length, or (reason, metric, detail) of its drop."""
    region = np.ones(dm.depth.shape, bool)
    if MASK in sample.artifacts:
        region = np.asarray(read_mask(ctx.store, sample.artifacts[MASK])) > 127
    values = dm.depth[region]
    valid = values[np.isfinite(values) & (values > 0)]
    if valid.size == 0 or not math.isfinite(dm.focal_px) or dm.focal_px <= 0:
        return INVALID_DEPTH, float(valid.size), f"focal {dm.focal_px}"
    height = dm.depth.shape[0]
    # The depth model's focal length is the view's estimated camera; pose estimation starts from it.
    k = intrinsics_from_focal(float(dm.focal_px), width, height)
    out = sample.replace(focal_px=float(dm.focal_px), intrinsics=[float(v) for v in k.ravel()])
    out.artifacts[DEPTH] = ctx.store.put_content("depth", _encode_depth(dm.depth), ".npz")
    out.metrics["depth_median_m"] = float(np.median(valid))
    out.metrics["depth_valid_ratio"] = float(valid.size / max(values.size, 1))
    out.metrics["fov_deg"] = math.degrees(2 * math.atan(width / (2 * dm.focal_px)))
    return out


def depth(samples: list[Sample], settings: BuildSettings, ctx: StageContext) -> StageResult:
    result = StageResult()
    if not samples:
        return result
    opts = settings.depth
    estimator = load_depth(settings)

    def finish(chunk, images, maps) -> list[Outcome]:
        jobs = list(zip(chunk, [im.width for im in images], maps, strict=True))
        return parallel_map(lambda job: _finish(*job, ctx), jobs)

    for chunk, outcomes in pipelined(
        list(batched(samples, opts.batch_size)),
        lambda chunk: read_views(ctx.store, chunk),
        lambda chunk, images: estimator.estimate(images, chunk, opts, ctx.seed),
        finish,
        device=ctx.device,
    ):
        record(result, STAGE, estimator.name, chunk, outcomes)
    return result
