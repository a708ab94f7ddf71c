"""`truth` detector: the ground-truth mask's box, dilated and jittered the way a detector errs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from refany3d.config import DetectorSettings
from refany3d.models._truth import TRUTH_LABEL, read_view_truth, truth_rng
from refany3d.models.detector.base import Detection
from refany3d.records import Sample


class TruthDetector:
    name = TRUTH_LABEL

    def __init__(self, weights: str = "", device: str = "cpu", dtype: str = "float32") -> None:
        del weights, device, dtype  # no model: ground truth is read per sample

    def detect(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        samples: Sequence[Sample],
        options: DetectorSettings,
        seed: int,
    ) -> list[Detection]:
        out = []
        for image, prompt, sample in zip(images, prompts, samples, strict=True):
            mask = read_view_truth(sample).mask
            box = _mask_box(mask)
            if box is None:
                out.append(Detection(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), []))
                continue
            rng = truth_rng(seed, sample, "detect")
            box = perturb_box(box, options.truth_dilation, options.truth_jitter, image.size, rng)
            out.append(Detection(box[None].astype(np.float32), np.ones(1, np.float32), [prompt.rstrip(". ")]))
        return out


def _mask_box(mask: np.ndarray) -> np.ndarray | None:
    """[x0, y0, x1, y1] of a (H, W) bool mask, pixel edges (x1/y1 exclusive); None when empty."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def perturb_box(
    box: np.ndarray, dilation: float, jitter: float, size: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """Grow each side by `dilation` × box size, move each corner by N(0, `jitter` × box size),
    clip to the (width, height) image."""
    w, h = box[2] - box[0], box[3] - box[1]
    scale = np.array([w, h, w, h])
    grown = box + np.array([-1.0, -1.0, 1.0, 1.0]) * dilation * scale
    moved = grown + rng.normal(0.0, 1.0, 4) * jitter * scale
    x0, x1 = sorted(np.clip(moved[[0, 2]], 0, size[0]))
    y0, y1 = sorted(np.clip(moved[[1, 3]], 0, size[1]))
    return np.array([x0, y0, x1, y1])
