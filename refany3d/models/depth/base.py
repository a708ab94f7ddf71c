"""What a depth backend does: metric depth and focal length of each view."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

from refany3d.config import DepthSettings
from refany3d.records import Sample


@dataclass(frozen=True)
class DepthMap:
    """depth: (H, W) float32 z-depth in metres (OpenCV camera, z forward), 0 where unknown;
    focal_px: focal length in pixels of the view (square pixels, principal point at the centre)."""

    depth: np.ndarray
    focal_px: float


class DepthEstimator(Protocol):
    name: str

    def estimate(
        self,
        images: Sequence[Image.Image],
        samples: Sequence[Sample],
        options: DepthSettings,
        seed: int,
    ) -> list[DepthMap]:
        """One DepthMap per RGB image, in one forward pass; `samples`/`seed` serve the `truth` backend."""
        ...
