"""What a pose backend does: the similarity pose (rotation, translation and the mesh's unknown
metric scale) of a mesh in one view, from the view's depth and mask."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import trimesh


class PoseNotFound(ValueError):
    """The estimator found no pose that explains the view (too little depth, nothing fits)."""


@dataclass(frozen=True)
class PoseResult:
    """pose: (4, 4) float64, maps mesh coordinates MULTIPLIED BY `scale` into the camera frame
    (OpenCV: x right, y down, z forward), i.e. x_cam = R (scale x_mesh) + t. scale: metres per
    mesh unit (1.0 for an already metric mesh). score: the estimator's own confidence in [0, 1].
    margin: in [-1, 1], how much better the pose explains the view than the closest different
    answer (one whose surface lies 2 % of the object's diameter or more away, ADD-S) on the pixels
    where the two tell apart (`refine.answer_margin`); about 0 where the view cannot tell two poses
    apart (a near-symmetric shape, a hidden handle); None where the backend does not say."""

    pose: np.ndarray
    scale: float
    score: float
    margin: float | None = None


class PoseEstimator(Protocol):
    name: str
    needs_rgb: bool  # whether `estimate` uses the RGB view (the stage decodes it only then)

    def estimate(
        self,
        mesh: trimesh.Trimesh,
        depth: np.ndarray,
        mask: np.ndarray,
        intrinsics: np.ndarray,
        rgb: np.ndarray | None = None,
    ) -> PoseResult:
        """Pose of `mesh` in the view: depth (H, W) float32 metres z-depth (0 = unknown), mask
        (H, W) bool, intrinsics (3, 3) OpenCV K, rgb (H, W, 3) uint8 (optional). Raises
        PoseNotFound when nothing fits."""
        ...
