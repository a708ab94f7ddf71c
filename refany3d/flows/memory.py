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


def collect_garbage() -> None:
    """Free the reference cycles the stages left behind (trimesh meshes with their textures, ...).

    CPython runs a full collection only once the objects that survived earlier ones have grown by
    a quarter; with Prefect and the stage libraries loaded that took many batches, and their cyclic
    garbage (hundreds of MB) piled up until then, so the flow's peak RSS grew with the dataset.
    Once per finished batch bounds it to about a batch's worth (≈ 0.2 s, against seconds of work).
    """
    gc.collect()
