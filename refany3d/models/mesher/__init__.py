"""Mesher backends (image -> untextured mesh in a canonical frame), chosen by `mesher.backend`."""

from __future__ import annotations

import functools

from refany3d.config import BuildSettings
from refany3d.models.mesher.base import Mesher, MesherTimeout
from refany3d.models.mesher.hunyuan3d import Hunyuan3DMesher
from refany3d.models.mesher.truth import TruthMesher

BACKENDS = {
    "truth": TruthMesher,
    "hunyuan3d": Hunyuan3DMesher,
}

__all__ = ["BACKENDS", "Mesher", "MesherTimeout", "load_mesher"]


def load_mesher(settings: BuildSettings) -> Mesher:
    """The mesher of `settings`, built once per process per backend, weights, variant and runtime."""
    m, rt = settings.mesher, settings.runtime
    return _load(m.backend, m.weights, rt.device, rt.dtype, m.dit, m.flashvdm, m.mc_algo, m.compile)


@functools.lru_cache(maxsize=2)
def _load(
    backend: str,
    weights: str,
    device: str,
    dtype: str,
    dit: str,
    flashvdm: bool,
    mc_algo: str,
    compile: bool,
) -> Mesher:
    return BACKENDS[backend](
        weights, device, dtype, dit=dit, flashvdm=flashvdm, mc_algo=mc_algo, compile=compile
    )
