"""`truth` depth: ground-truth depth with a global log-scale error and relative per-pixel noise."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from refany3d.config import DepthSettings
from refany3d.models._truth import TRUTH_LABEL, read_view_truth, truth_rng
from refany3d.models.depth.base import DepthMap
from refany3d.records import Sample


class TruthDepthEstimator:
    name = TRUTH_LABEL

    def __init__(self, weights: str = "", device: str = "cpu", dtype: str = "float32") -> None:
        del weights, device, dtype  # no model: ground truth is read per sample

    def estimate(
        self, images: Sequence[Image.Image], samples: Sequence[Sample], options: DepthSettings, seed: int
    ) -> list[DepthMap]:
        out = []
        for _image, sample in zip(images, samples, strict=True):
            truth = read_view_truth(sample)
            rng = truth_rng(seed, sample, "depth")
            # A monocular model gets the scale wrong for the whole image (and its focal length with it).
            scale = float(np.exp(rng.normal(0.0, options.truth_scale_error)))
            noise = 1.0 + rng.normal(0.0, options.truth_noise, truth.depth.shape)
            depth = (truth.depth * scale * noise).astype(np.float32)
            depth[truth.depth <= 0] = 0.0
            focal = float(truth.intrinsics[0, 0]) * float(np.exp(rng.normal(0.0, options.truth_focal_error)))
            out.append(DepthMap(depth, focal))
        return out
