"""Detector backends (text-prompted boxes), chosen by `detector.backend`."""

from __future__ import annotations

import functools

from refany3d.config import BuildSettings
from refany3d.models._torch import accelerate
from refany3d.models.detector.base import Detection, Detector
from refany3d.models.detector.groundingdino import GroundingDinoDetector
from refany3d.models.detector.hf_grounding_dino import HfGroundingDinoDetector
from refany3d.models.detector.truth import TruthDetector

BACKENDS = {
    "truth": TruthDetector,
    "groundingdino": GroundingDinoDetector,
    "hf-grounding-dino": HfGroundingDinoDetector,
}

__all__ = ["BACKENDS", "Detection", "Detector", "load_detector"]


def load_detector(settings: BuildSettings) -> Detector:
    """The detector of `settings`, built once per process per backend, weights and runtime options."""
    d, rt = settings.detector, settings.runtime
    return _load(
        d.backend, d.weights, rt.device, rt.dtype, d.text_encoder, d.config, d.compile, d.cuda_graphs
    )


@functools.lru_cache(maxsize=2)
def _load(
    backend: str,
    weights: str,
    device: str,
    dtype: str,
    text_encoder: str,
    config: str,
    compile: bool,
    cuda_graphs: bool,
) -> Detector:
    if backend == "groundingdino":  # the only backend with more than one weights location
        return GroundingDinoDetector(weights, device, dtype, text_encoder=text_encoder, config=config)
    return accelerate(BACKENDS[backend](weights, device, dtype), compile, cuda_graphs)
