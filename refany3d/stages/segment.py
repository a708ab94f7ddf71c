"""Segment stage: the subject's mask from its detected box (box-prompted segmenter).

Drops masks that cover more than `segmenter.max_area_ratio` of the view (the paper's rule: the
subject must not fill the frame), less than `min_area_ratio`, or that fall apart into more than
`max_components` connected parts (specks under `min_component_ratio` of the mask not counted).
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

from refany3d.config import BuildSettings, SegmenterSettings
from refany3d.models.segmenter import Segmentation, load_segmenter
from refany3d.records import MASK, Sample, StageResult
from refany3d.stages._views import (
    Outcome,
    batched,
    parallel_map,
    pipelined,
    read_views,
    ready_samples,
    record,
)
from refany3d.stages.context import StageContext

STAGE = "segment"
MISSING_BOX = "missing_box"
MASK_TOO_LARGE = "mask_too_large"
MASK_TOO_SMALL = "mask_too_small"
MASK_FRAGMENTED = "mask_fragmented"


def _components(mask: np.ndarray, min_ratio: float) -> int:
    """8-connected parts of a (H, W) bool mask holding at least `min_ratio` of its pixels."""
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    areas = stats[1:count, cv2.CC_STAT_AREA]
    return int((areas >= min_ratio * max(int(mask.sum()), 1)).sum())


def _encode_mask(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _finish(sample: Sample, seg: Segmentation, opts: SegmenterSettings, ctx: StageContext) -> Outcome:
    """The kept sample with its stored mask, or (reason, metric, detail) of its drop."""
    ratio = float(seg.mask.mean())
    if ratio > opts.max_area_ratio:
        return MASK_TOO_LARGE, ratio, ""
    if ratio < opts.min_area_ratio:
        return MASK_TOO_SMALL, ratio, ""
    parts = _components(seg.mask, opts.min_component_ratio)
    if parts > opts.max_components:
        return MASK_FRAGMENTED, float(parts), ""
    out = sample.replace()
    out.artifacts[MASK] = ctx.store.put_content("mask", _encode_mask(seg.mask), ".png")
    out.metrics.update(mask_area_ratio=ratio, mask_components=float(parts), mask_score=seg.score)
    return out


def segment(samples: list[Sample], settings: BuildSettings, ctx: StageContext) -> StageResult:
    result = StageResult()
    opts = settings.segmenter
    todo = ready_samples(samples, result, STAGE, lambda s: (MISSING_BOX, "") if s.box is None else None)
    if not todo:
        return result
    segmenter = load_segmenter(settings)
    for chunk, outcomes in pipelined(
        list(batched(todo, opts.batch_size)),
        lambda chunk: read_views(ctx.store, chunk),
        lambda chunk, images: segmenter.segment(images, [s.box for s in chunk], chunk, opts, ctx.seed),
        lambda chunk, images, masks: parallel_map(
            lambda pair: _finish(*pair, opts, ctx), list(zip(chunk, masks, strict=True))
        ),
        device=ctx.device,
    ):
        record(result, STAGE, segmenter.name, chunk, outcomes)
    return result
