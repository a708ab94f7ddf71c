"""`truth` segmenter: the ground-truth mask with a randomly wobbling boundary."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image

from refany3d.config import SegmenterSettings
from refany3d.models._truth import TRUTH_LABEL, read_view_truth, truth_rng
from refany3d.models.segmenter.base import Segmentation
from refany3d.records import Sample


class TruthSegmenter:
    name = TRUTH_LABEL

    def __init__(
        self, weights: str = "", device: str = "cpu", dtype: str = "float32", model_type: str = ""
    ) -> None:
        del weights, device, dtype, model_type  # no model: ground truth is read per sample

    def segment(
        self,
        images: Sequence[Image.Image],
        boxes: Sequence[Sequence[float]],
        samples: Sequence[Sample],
        options: SegmenterSettings,
        seed: int,
    ) -> list[Segmentation]:
        out = []
        for _image, _box, sample in zip(images, boxes, samples, strict=True):
            mask = read_view_truth(sample).mask
            rng = truth_rng(seed, sample, "segment")
            out.append(Segmentation(noisy_boundary(mask, options.truth_boundary_noise, rng), 1.0))
        return out


def noisy_boundary(mask: np.ndarray, radius: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W) bool mask whose boundary moves in and out by up to `radius` px.

    A smooth random field in [-radius, radius] is added to the signed distance to the boundary
    before thresholding at 0, so the edge shifts by a spatially coherent amount (like a
    segmenter's) instead of salt-and-pepper flips, whatever the object's size.
    """
    if radius <= 0 or not mask.any() or mask.all():
        return mask.copy()
    m = mask.astype(np.uint8)
    signed = cv2.distanceTransform(m, cv2.DIST_L2, 3) - cv2.distanceTransform(1 - m, cv2.DIST_L2, 3)
    field = cv2.GaussianBlur(rng.standard_normal(mask.shape).astype(np.float32), (0, 0), 4.0 * radius)
    field = np.clip(field / max(float(field.std()), 1e-6) * 0.5, -1.0, 1.0) * radius
    return (signed + field) > 0
