"""What a detector backend does: text-prompted boxes for a batch of views."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

from refany3d.config import DetectorSettings
from refany3d.records import Sample


@dataclass(frozen=True)
class Detection:
    """Boxes of one image. boxes: (n, 4) float32 [x0, y0, x1, y1] pixels; scores: (n,) float32 in
    [0, 1]; phrases: n matched prompt phrases ('' when no token passed the text threshold)."""

    boxes: np.ndarray
    scores: np.ndarray
    phrases: list[str]


class Detector(Protocol):
    name: str

    def detect(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        samples: Sequence[Sample],
        options: DetectorSettings,
        seed: int,
    ) -> list[Detection]:
        """One Detection per RGB image, boxes above `options.box_threshold`, in one forward pass.

        `samples` and `seed` matter only to the `truth` backend (ground truth, seeded perturbation).
        """
        ...
