"""Helpers shared by the perception stages (detect, segment, depth): batching and view images."""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from typing import TypeVar

from PIL import Image

from refany3d.records import IMAGE, Sample
from refany3d.storage.store import ArtifactStore

T = TypeVar("T")


def batched(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most `size` items (one model forward pass each)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def read_view(store: ArtifactStore, sample: Sample) -> Image.Image:
    """The sample's S×S view as an RGB PIL image."""
    image = Image.open(io.BytesIO(store.get(sample.artifacts[IMAGE])))
    return image.convert("RGB")


def read_mask(store: ArtifactStore, uri: str) -> Image.Image:
    """A stored 8-bit mask PNG (255 = object)."""
    return Image.open(io.BytesIO(store.get(uri))).convert("L")
