"""Depth backends (metric depth + focal length), chosen by `depth.backend`."""

from __future__ import annotations

import functools

from refany3d.config import BuildSettings
from refany3d.models._torch import accelerate
from refany3d.models.depth.base import DepthEstimator, DepthMap
from refany3d.models.depth.depth_pro import DepthProEstimator
from refany3d.models.depth.truth import TruthDepthEstimator

BACKENDS = {
    "truth": TruthDepthEstimator,
    "depth-pro": DepthProEstimator,
}

__all__ = ["BACKENDS", "DepthEstimator", "DepthMap", "load_depth"]


def load_depth(settings: BuildSettings) -> DepthEstimator:
    """The depth backend of `settings`, built once per process per backend, weights and runtime options."""
    d, rt = settings.depth, settings.runtime
    return _load(d.backend, d.weights, rt.device, rt.dtype, d.compile, d.cuda_graphs)


@functools.lru_cache(maxsize=2)
def _load(
    backend: str, weights: str, device: str, dtype: str, compile: bool, cuda_graphs: bool
) -> DepthEstimator:
    return accelerate(BACKENDS[backend](weights, device, dtype), compile, cuda_graphs)
