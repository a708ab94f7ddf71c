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
    """(H, W) bool mask whose boundary moves in and out by up to about `radius` px.

    A smooth random field is added to the blurred mask before thresholding at 0.5, so the edge
    shifts by a spatially coherent amount (like a segmenter's) instead of salt-and-pepper flips.
    """
    if radius <= 0 or not mask.any():
        return mask.copy()
    sigma = float(radius)
    soft = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigma)
    field = cv2.GaussianBlur(rng.standard_normal(mask.shape).astype(np.float32), (0, 0), 2 * sigma)
    field *= 0.25 / max(float(field.std()), 1e-6)
    return (soft + field) > 0.5
