"""Process memory policy of a build: few malloc arenas, freed memory handed back, cycles collected.

A build's resident memory must not grow with the dataset (issue 5). Stage work is transient
(images, depth maps, Parquet pages of a batch), but the allocators keep what was freed for reuse:
glibc in an arena per thread (up to 8 per core; Prefect alone starts ~10 threads), Arrow's
mimalloc pool per thread too. Their high-water marks only rise, and a long build with two tasks
side by side sees more and higher overlaps than a short one. So the process uses few arenas and
hands freed memory back after each task; cyclic garbage is collected after each batch.
"""

from __future__ import annotations

import ctypes
import gc
import time
from collections.abc import Callable
from functools import cache

import pyarrow as pa

_M_ARENA_MAX = -8  # glibc mallopt parameter: the most malloc arenas the process creates
MALLOC_ARENAS = 2


@cache
def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (has mallopt and malloc_trim); None elsewhere (musl, macOS)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


@cache
def limit_malloc_arenas() -> None:
    """At most `MALLOC_ARENAS` glibc arenas from now on in this process (once per process)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_ARENA_MAX, MALLOC_ARENAS)


def release_free_memory() -> None:
    """Return the memory Arrow's pool and glibc's heaps keep for reuse to the OS (a few ms)."""
    pa.default_memory_pool().release_unused()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _collect_everything() -> None:
    """A full collection over every object, the frozen ones too; then freeze the survivors."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class GarbageCollector:
    """Frees the reference cycles the stages leave behind (trimesh meshes with their textures, ...)
    after each batch, without stopping the build for long; `with` it over a build.

    CPython runs a full collection only once the objects that survived earlier ones have grown by
    a quarter; with Prefect and the stage libraries loaded that took many batches, and their cyclic
    garbage (hundreds of MB) piled up until then, so the flow's peak RSS grew with the dataset. So
    the flow collects after each batch. But a collection holds the GIL over every object it scans,
    and every stage thread (and the GPU they feed) waits: the models, Prefect and the libraries
    are ~740k long-lived objects, 0.36 s a collection with the tiny models on the CPU machine, 7.7 %
    of the wall of a build of 2-row batches. So the survivors of a full collection are frozen
    (`gc.freeze`: left out of later collections), and the collection after a batch scans only what
    is newer (milliseconds); a full one, which also frees what died among the frozen objects (a
    batch then in flight), runs once the build has run `1 / share` times as long as the last took.
    Leaving, it unfreezes everything.
    """

    def __init__(
        self,
        share: float = 0.01,
        clock: Callable[[], float] = time.monotonic,
        collect_everything: Callable[[], object] = _collect_everything,
        collect_newer: Callable[[], object] = gc.collect,
    ) -> None:
        self._share, self._clock = share, clock
        self._everything, self._newer = collect_everything, collect_newer
        self._cost = 0.0  # of the last full collection
        self._since = clock()  # when it ended

    def __enter__(self) -> GarbageCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        gc.unfreeze()

    def after_batch(self) -> bool:
        """Collect; a full collection (True) if the time since the last is at least its cost / share."""
        if self._clock() - self._since < self._cost / self._share:
            self._newer()
            return False
        start = self._clock()
        self._everything()
        self._since = self._clock()
        self._cost = self._since - start
        return True
