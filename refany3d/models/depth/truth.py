"""`truth` depth: the synthetic view's exact depth erred the way a metric depth network errs (a
backdrop behind the object, flying pixels across the silhouette, a smooth low-frequency error, a
global scale error, per-pixel noise; `refany3d.synthetic.perception_errors`) and a focal-length
error."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from refany3d.config import DepthSettings
from refany3d.models._truth import TRUTH_LABEL, read_view_truth, truth_rng
from refany3d.models.depth.base import DepthMap
from refany3d.records import Sample
from refany3d.synthetic.perception_errors import DepthErrors, erred_depth


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
            depth = erred_depth(truth.depth, truth.mask, DepthErrors.of(options), rng).depth
            # A monocular model gets the focal length wrong for the whole image too.
            focal = float(truth.intrinsics[0, 0]) * float(np.exp(rng.normal(0.0, options.truth_focal_error)))
            out.append(DepthMap(depth, focal))
        return out
