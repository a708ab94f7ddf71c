"""What a segmenter backend does: one object mask per (view, box prompt)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

from refany3d.config import SegmenterSettings
from refany3d.records import Sample


@dataclass(frozen=True)
class Segmentation:
    """mask: (H, W) bool, True = object, pixels of the view; score: predicted IoU (1.0 for truth)."""

    mask: np.ndarray
    score: float


class Segmenter(Protocol):
    name: str

    def segment(
        self,
        images: Sequence[Image.Image],
        boxes: Sequence[Sequence[float]],
        samples: Sequence[Sample],
        options: SegmenterSettings,
        seed: int,
    ) -> list[Segmentation]:
        """One mask per RGB image from its [x0, y0, x1, y1] pixel box, in one forward pass.

        `samples` and `seed` matter only to the `truth` backend.
        """
        ...
