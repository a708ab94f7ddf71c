"""Helpers shared by the perception stages (detect, segment, depth): batching and view images."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from PIL import Image

from refany3d.records import IMAGE, Sample
from refany3d.storage.store import ArtifactStore

T = TypeVar("T")
R = TypeVar("R")


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


def parallel_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """`[fn(x) for x in items]` on a few threads, in order.

    PNG/zlib coding and file I/O release the GIL, so a batch's images decode (and its outputs
    encode) on several cores while the previous forward pass is still on the GPU's queue.
    """
    workers = min(len(items), os.cpu_count() or 1, 8)
    if workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def read_views(store: ArtifactStore, samples: Sequence[Sample]) -> list[Image.Image]:
    """The samples' views as RGB PIL images, decoded in parallel."""
    return parallel_map(lambda s: read_view(store, s), samples)
