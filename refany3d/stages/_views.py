"""Helpers shared by the perception stages (detect, segment, depth): batching and view images."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import TypeVar

import numpy as np
from PIL import Image

from refany3d.records import IMAGE, Sample, StageResult
from refany3d.storage.store import ArtifactStore

T = TypeVar("T")
R = TypeVar("R")
L = TypeVar("L")
Out = TypeVar("Out")

# What a stage decides for one sample: the kept sample, or (reason, metric, detail) of its drop.
Outcome = Sample | tuple[str, float | None, str]


def batched(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most `size` items (one model forward pass each)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def ready_samples(
    samples: Sequence[Sample],
    result: StageResult,
    stage: str,
    lacks: Callable[[Sample], tuple[str, str] | None],
) -> list[Sample]:
    """The samples that have what `stage` reads, in order; each other one is dropped into `result`
    with the (reason, detail) that `lacks` gives it. Checked before the model loads, so that a
    batch with nothing to do loads none."""
    ready = []
    for sample in samples:
        missing = lacks(sample)
        if missing is None:
            ready.append(sample)
        else:
            result.drop(sample, stage, missing[0], detail=missing[1])
    return ready


def read_view(store: ArtifactStore, sample: Sample) -> Image.Image:
    """The sample's S×S view as an RGB PIL image."""
    image = Image.open(io.BytesIO(store.get(sample.artifacts[IMAGE])))
    return image.convert("RGB")


def read_mask(store: ArtifactStore, uri: str) -> Image.Image:
    """A stored 8-bit mask PNG (255 = object)."""
    return Image.open(io.BytesIO(store.get(uri))).convert("L")


def read_depth(store: ArtifactStore, uri: str) -> np.ndarray:
    """(H, W) float32 metres z-depth of a depth artifact (npz, key "depth"; 0 = unknown)."""
    with np.load(io.BytesIO(store.get(uri)), allow_pickle=False) as data:
        return data["depth"].astype(np.float32)


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


def pipelined(
    chunks: Sequence[Sequence[T]],
    load: Callable[[Sequence[T]], L],
    infer: Callable[[Sequence[T], L], Out],
    finish: Callable[[Sequence[T], L, Out], R],
    device: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> Iterator[tuple[Sequence[T], R]]:
    """(chunk, finish(chunk, loaded, infer(chunk, loaded))) for each chunk, in order, where
    loaded = load(chunk).

    `infer` (the forward pass) runs on the calling thread, one chunk at a time, each inside a
    `device()` context of its own (a turn on the stage's GPU slot, `StageContext.device`): while
    the stage waits for a chunk's `load`, or after its last forward pass, it holds no turn, and
    another batch's GPU stage runs its forward pass meanwhile (one turn over all the chunks would
    keep those waiting on this stage's host work, as a plain loop's device lock never does). The
    next chunk's `load` (decode, read) runs on a thread of its own and the chunks' `finish`
    (checks, encode, write) on two others, so a stage's host work hides behind the GPU instead of
    adding to it, and a slow `finish` never delays the next forward pass.
    """
    if not chunks:
        return
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage-load") as loads,
        ThreadPoolExecutor(max_workers=2, thread_name_prefix="stage-finish") as finishes,
    ):
        upcoming: Future = loads.submit(load, chunks[0])
        finishing: list[Future] = []
        for index, chunk in enumerate(chunks):
            loaded = upcoming.result()
            if index + 1 < len(chunks):
                upcoming = loads.submit(load, chunks[index + 1])
            with device():
                outputs = infer(chunk, loaded)
            finishing.append(finishes.submit(finish, chunk, loaded, outputs))
        for chunk, done in zip(chunks, finishing, strict=True):
            yield chunk, done.result()


def record(
    result: StageResult,
    stage: str,
    backend: str | None,
    chunk: Sequence[Sample],
    outcomes: Sequence[Outcome],
    transient: Collection[str] = (),
) -> None:
    """Add a chunk's outcomes to `result` in sample order: kept samples tagged with the backend
    that made them (unless None), drops with their reason (transient when it is in `transient`)."""
    for sample, outcome in zip(chunk, outcomes, strict=True):
        if isinstance(outcome, tuple):
            reason, metric, detail = outcome
            result.drop(sample, stage, reason, metric=metric, detail=detail, transient=reason in transient)
        else:
            if backend is not None:
                outcome.backends[stage] = backend
            result.kept.append(outcome)
