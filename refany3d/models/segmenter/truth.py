"""`truth` segmenter: the synthetic view's exact mask erred the way SAM errs from a box (a wobbling,
ragged boundary, grown or shrunk, bleeding onto the background on one stretch;
`refany3d.synthetic.perception_errors`)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from refany3d.config import SegmenterSettings
from refany3d.models._truth import TRUTH_LABEL, read_view_truth, truth_rng
from refany3d.models.segmenter.base import Segmentation
from refany3d.records import Sample
from refany3d.synthetic.perception_errors import MaskErrors, erred_mask


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
            out.append(Segmentation(erred_mask(mask, MaskErrors.of(options), rng), 1.0))
        return out
