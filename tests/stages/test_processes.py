import os
import time

import pytest
import torch

from refany3d.render.mesh import own_temp_directory
from refany3d.stages._processes import Crashed, SharedProcessPool, threads_per_process


def _square(x: int) -> int:
    return x * x


def _slow_square(x: int) -> int:
    time.sleep(1.0)  # still running when the other call's process dies
    return x * x


def _die() -> None:
    os._exit(3)  # a native crash: the process ends without an exception


def test_calls_run_in_the_shared_processes_and_a_changed_size_gets_a_new_pool():
    pool = SharedProcessPool()
    try:
        assert [c.result() for c in [pool.submit(2, _square, x) for x in range(5)]] == [0, 1, 4, 9, 16]
        first = pool._current(2)
        assert pool._current(2) is first and pool._current(3) is not first
    finally:
        pool.close()


def test_a_crash_gives_up_only_its_own_call_and_the_pool_is_replaced():
    pool = SharedProcessPool()
    try:
        broken = pool._current(2)
        calls = [pool.submit(2, _slow_square, 3), pool.submit(2, _die), pool.submit(2, _slow_square, 4)]
        with pytest.raises(Crashed, match="died in the shared pool and again alone"):
            calls[1].result()
        assert calls[0].result() == 9 and calls[2].result() == 16  # bystanders of the crash
        assert pool._current(2) is not broken
        assert pool.submit(2, _square, 5).result() == 25
    finally:
        pool.close()


def _thread_counts() -> dict[str, int]:
    import numpy  # noqa: F401  (its OpenBLAS, if not loaded yet)
    from threadpoolctl import threadpool_info

    counts = {info["internal_api"]: info["num_threads"] for info in threadpool_info()}
    return counts | {"torch": torch.get_num_threads()}


def _in_this_module() -> None:
    """An initializer whose module (this one) loads torch before the limit."""


@pytest.mark.parametrize("initializer", [own_temp_directory, _in_this_module])
def test_each_process_gets_its_share_of_the_cores(initializer):
    # Each initializer's module loads libraries while it is unpickled, before the limit (numpy and
    # trimesh, as in the mesh stage's processes; torch): those already loaded are limited too.
    processes = os.cpu_count()
    pool = SharedProcessPool(initializer=initializer)
    try:
        counts = pool.submit(processes, _thread_counts).result()
        assert "openblas" in counts and set(counts.values()) == {threads_per_process(processes)} == {1}
    finally:
        pool.close()


def test_a_call_run_alone_gets_every_core():
    assert threads_per_process(1) == os.cpu_count() and threads_per_process(10**6) == 1
