"""What a texturer backend does: colour a reduced, UV-unwrapped mesh from the object's photo."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import trimesh

from refany3d.config import TexturerSettings


@dataclass(frozen=True)
class Texturing:
    """mesh: the textured copy (same geometry and UVs, base-colour atlas); pose: (4, 4) float64
    canonical -> front camera (OpenCV); intrinsics: (3, 3) float64 px of the photo; iou: the
    front silhouette's IoU with the mask; seen: fraction of atlas texels taken from the photo."""

    mesh: trimesh.Trimesh
    pose: np.ndarray
    intrinsics: np.ndarray
    iou: float
    seen: float


class Texturer(Protocol):
    name: str

    def texture(
        self,
        mesh: trimesh.Trimesh,
        image: np.ndarray,
        mask: np.ndarray,
        atlas_size: int,
        options: TexturerSettings,
    ) -> Texturing:
        """Texture `mesh` (canonical frame, with UVs) from the (H, W, 3) uint8 photo `image` whose
        (H, W) bool `mask` is the object, into an atlas_size² base-colour texture."""
        ...
