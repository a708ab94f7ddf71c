"""A worker process's pool of spawned processes for a stage's CPU-bound work, shared by every task
of that stage in the worker (the thread runner runs several at once) and replaced when one of its
processes dies.

Spawned, not forked: the parent holds CUDA (and GL) state that a fork must not inherit. A process
that dies (a native crash in a mesh library) breaks the whole pool, so every call in it at that
moment fails: each such call runs once more, alone in a process of its own, so that a call that
only shared the pool with the crash succeeds and the one that caused it is given up on (`Crashed`).

The processes share the worker's cores: each one's native thread pools (OpenBLAS, OpenMP, torch)
get `cpu_count // processes` threads. Left at their default, every process starts a thread per core:
on the 16-core GPU worker, 12 processes spent 16.4 CPU s an object where the 2-core CPU machine
spends 3.55 (bench/results/gpu_build_h200_run3_partial.md), and on the CPU machine one thread a
process already saves 18 % of the CPU time.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

# Read by OpenBLAS, OpenMP and MKL as they load.
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def threads_per_process(processes: int) -> int:
    return max(1, (os.cpu_count() or 1) // processes)


def limit_threads(threads: int) -> None:
    """Give this process's native thread pools `threads` threads: those it loads from now on through
    the environment, those already loaded (numpy's OpenBLAS, loaded while the initializer was
    unpickled) through threadpoolctl."""
    from threadpoolctl import threadpool_limits

    for name in _THREAD_VARIABLES:
        os.environ[name] = str(threads)
    threadpool_limits(limits=threads)  # torch's OpenMP among them: it reads its thread count on first use


def _start_process(threads: int, initializer: Callable[[], None] | None) -> None:
    limit_threads(threads)
    if initializer is not None:
        initializer()


class Crashed(Exception):
    """A call whose process died, in the shared pool and again alone."""


class SharedProcessPool:
    """`initializer`: called in each process as it starts."""

    def __init__(self, initializer: Callable[[], None] | None = None) -> None:
        self._initializer = initializer
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._size = 0
        atexit.register(self.close)

    def _current(self, processes: int) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None or self._size != processes:
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                self._pool, self._size = self._new(processes), processes
            return self._pool

    def _new(self, processes: int) -> ProcessPoolExecutor:
        context = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(
            processes,
            mp_context=context,
            initializer=_start_process,
            initargs=(threads_per_process(processes), self._initializer),
        )

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:  # not yet replaced by another thread that saw it break
                broken.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    def submit(self, processes: int, fn: Callable, *args: Any) -> Call:
        """Start `fn(*args)` in the pool of `processes` processes (started on first use)."""
        return Call(self, processes, fn, args)

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None


class Call:
    """One submitted call: `result()` waits for it, running it once more alone if its pool broke."""

    def __init__(self, owner: SharedProcessPool, processes: int, fn: Callable, args: tuple) -> None:
        self._owner, self._fn, self._args = owner, fn, args
        self._pool = owner._current(processes)
        try:
            self._future: Future | None = self._pool.submit(fn, *args)
        except BrokenProcessPool:  # broken since by another call's crash: this one runs alone
            owner._replace(self._pool)
            self._future = None

    def result(self) -> Any:
        if self._future is not None:
            try:
                return self._future.result()
            except BrokenProcessPool:
                self._owner._replace(self._pool)
        with self._owner._new(1) as alone:
            try:
                return alone.submit(self._fn, *self._args).result()
            except BrokenProcessPool:
                raise Crashed("its process died in the shared pool and again alone") from None
