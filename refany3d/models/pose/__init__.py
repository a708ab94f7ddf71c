"""6D pose backends (rotation, translation and the mesh's metric scale), chosen by `pose.backend`."""

from __future__ import annotations

import functools

from refany3d.config import BuildSettings, PoseSettings
from refany3d.models.pose.base import PoseEstimator, PoseNotFound, PoseResult
from refany3d.models.pose.builtin import BuiltinPoseEstimator
from refany3d.models.pose.foundationpose import (
    FoundationPoseEstimator,
)  # imports its CUDA stack only when built

BACKENDS = {
    "builtin": BuiltinPoseEstimator,
    "foundationpose": FoundationPoseEstimator,
}

__all__ = ["BACKENDS", "PoseEstimator", "PoseNotFound", "PoseResult", "load_pose_estimator"]


def load_pose_estimator(settings: BuildSettings | PoseSettings) -> PoseEstimator:
    """The pose backend of `settings`, built once per process per pose settings."""
    return _load(settings.pose if isinstance(settings, BuildSettings) else settings)


@functools.lru_cache(maxsize=2)
def _load(options: PoseSettings) -> PoseEstimator:
    return BACKENDS[options.backend](options)
