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
    """The pose backend of `settings`, built once per process per pose settings and device.
    The built-in estimator takes its GPU path (`batched`) where `runtime.device` is CUDA; given
    pose settings alone, it runs on the CPU."""
    if isinstance(settings, PoseSettings):
        return _load(settings, "cpu")
    return _load(settings.pose, settings.runtime.device)


@functools.lru_cache(maxsize=2)
def _load(options: PoseSettings, device: str) -> PoseEstimator:
    if options.backend == "builtin" and device.startswith("cuda"):
        from refany3d.models.pose.batched import BatchedPoseEstimator  # imports torch

        return BatchedPoseEstimator(options, device)
    return BACKENDS[options.backend](options)
