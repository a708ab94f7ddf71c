"""Texturer backends (photo -> base-colour atlas of a generated mesh), chosen by `texturer.backend`."""

from __future__ import annotations

import functools

from refany3d.config import BuildSettings
from refany3d.models.texturer.base import Texturer, Texturing
from refany3d.models.texturer.projection import ProjectionTexturer

BACKENDS = {
    "projection": ProjectionTexturer,
}

__all__ = ["BACKENDS", "Texturer", "Texturing", "load_texturer"]


def load_texturer(settings: BuildSettings) -> Texturer:
    """The texturer of `settings`, built once per process per backend."""
    return _load(settings.texturer.backend)


@functools.lru_cache(maxsize=2)
def _load(backend: str) -> Texturer:
    return BACKENDS[backend]()
