"""Detect stage: one box per view around the subject named by `sample.item` (text-prompted detector).

The detector (`detector.backend`) returns every box above `detector.box_threshold` with the prompt
phrase its tokens matched above `detector.text_threshold`; the stage keeps the highest-scoring box
whose phrase is not empty and whose area inside the view is positive.
"""

from __future__ import annotations

import numpy as np

from refany3d.config import BuildSettings
from refany3d.models.detector import Detection, load_detector
from refany3d.records import Sample, StageResult
from refany3d.stages._views import Outcome, batched, pipelined, read_views, ready_samples, record
from refany3d.stages.context import StageContext

STAGE = "detect"
NO_DETECTION = "no_detection"
EMPTY_PROMPT = "empty_prompt"


def _prompt(item: str) -> str:
    """Grounding-DINO caption: lowercase, ending with '.' ('' when there is nothing to look for)."""
    text = " ".join(item.lower().split()).rstrip(". ")
    return f"{text}." if text else ""


def _lacks_prompt(sample: Sample) -> tuple[str, str] | None:
    return None if _prompt(sample.item) else (EMPTY_PROMPT, "sample.item is empty")


def _best_box(det: Detection, box_threshold: float, size: tuple[int, int]) -> tuple[np.ndarray, float] | None:
    """(box clipped to the (width, height) view, score) of the best usable box, or None."""
    best = None
    for box, score, phrase in zip(det.boxes, det.scores, det.phrases, strict=True):
        if score < box_threshold or not phrase.strip():
            continue
        clipped = np.clip(np.asarray(box, dtype=np.float64), 0, [size[0], size[1], size[0], size[1]])
        if clipped[2] - clipped[0] <= 0 or clipped[3] - clipped[1] <= 0:
            continue
        if best is None or score > best[1]:
            best = (clipped, float(score))
    return best


def _outcome(sample: Sample, image_size: tuple[int, int], det: Detection, box_threshold: float) -> Outcome:
    """The kept sample with its box, or (reason, metric, detail) of its drop."""
    best = _best_box(det, box_threshold, image_size)
    if best is None:
        top = float(det.scores.max()) if len(det.scores) else 0.0
        return NO_DETECTION, top, f"prompt {_prompt(sample.item)!r}: {len(det.scores)} box(es)"
    box, score = best
    out = sample.replace(box=[float(v) for v in box])
    out.metrics["box_score"] = score
    out.metrics["box_area_ratio"] = float(
        (box[2] - box[0]) * (box[3] - box[1]) / (image_size[0] * image_size[1])
    )
    return out


def detect(samples: list[Sample], settings: BuildSettings, ctx: StageContext) -> StageResult:
    result = StageResult()
    opts = settings.detector
    todo = ready_samples(samples, result, STAGE, _lacks_prompt)
    if not todo:
        return result
    detector = load_detector(settings)
    for chunk, outcomes in pipelined(
        list(batched(todo, opts.batch_size)),
        lambda chunk: read_views(ctx.store, chunk),
        lambda chunk, images: detector.detect(
            images, [_prompt(s.item) for s in chunk], chunk, opts, ctx.seed
        ),
        lambda chunk, images, detections: [
            _outcome(s, im.size, det, opts.box_threshold)
            for s, im, det in zip(chunk, images, detections, strict=True)
        ],
        device=ctx.device,
    ):
        record(result, STAGE, detector.name, chunk, outcomes)
    return result
