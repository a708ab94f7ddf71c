"""Sampling: a 3D asset + a prompt -> an image and its point map (`RefAny3DPipeline`).

    from refany3d.sampling import RefAny3DPipeline

The pipeline loads lazily (`import refany3d.sampling.assets` stays light: no torch model code).
"""

from __future__ import annotations

from typing import Any

__all__ = ["RefAny3DPipeline", "SampleOutput"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from refany3d.sampling import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'refany3d.sampling' has no attribute {name!r}")
