"""Segmenter backends (box-prompted masks), chosen by `segmenter.backend`."""

from __future__ import annotations

import functools

from refany3d.config import BuildSettings
from refany3d.models._torch import accelerate
from refany3d.models.segmenter.base import Segmentation, Segmenter
from refany3d.models.segmenter.hf_sam import HfSamSegmenter
from refany3d.models.segmenter.sam import SamSegmenter
from refany3d.models.segmenter.truth import TruthSegmenter

BACKENDS = {
    "truth": TruthSegmenter,
    "sam": SamSegmenter,
    "hf-sam": HfSamSegmenter,
}

__all__ = ["BACKENDS", "Segmentation", "Segmenter", "load_segmenter"]


def load_segmenter(settings: BuildSettings) -> Segmenter:
    """The segmenter of `settings`, built once per process per backend, weights and runtime options."""
    s, rt = settings.segmenter, settings.runtime
    return _load(s.backend, s.weights, rt.device, rt.dtype, s.model_type, s.compile, s.cuda_graphs)


@functools.lru_cache(maxsize=2)
def _load(
    backend: str, weights: str, device: str, dtype: str, model_type: str, compile: bool, cuda_graphs: bool
) -> Segmenter:
    return accelerate(BACKENDS[backend](weights, device, dtype, model_type=model_type), compile, cuda_graphs)
