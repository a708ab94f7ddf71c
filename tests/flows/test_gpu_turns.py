"""A worker process's GPU turns (`flows/gpu_turns.py`): its threads hand a slot it took from one to
the next without the server, never hold more than the machine's slots, and give them back after
the linger, after the longest hold and at the flow's end; with a real Prefect limit, too."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from refany3d.config import BuildSettings, override
from refany3d.flows.gpu_turns import GpuTurns


class _Limit:
    """A machine limit of `size` slots that counts what the server would see; taking a slot costs
    `delay` s (Prefect's polling)."""

    def __init__(self, size: int = 1, delay: float = 0.0) -> None:
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self.delay, self.asked, self.acquired, self.held, self.most = delay, 0, 0, 0, 0

    @contextlib.contextmanager
    def slot(self):
        with self._lock:
            self.asked += 1
        time.sleep(self.delay)
        self._slots.acquire()
        with self._lock:
            self.acquired += 1
            self.held += 1
            self.most = max(self.most, self.held)
        try:
            yield
        finally:
            with self._lock:
                self.held -= 1
            self._slots.release()


def _turns_on_threads(turns: GpuTurns, slots: int, threads: int, each: int, inside_s: float = 0.005) -> int:
    """`threads` threads taking `each` turns; the most turns at once."""
    lock, state = threading.Lock(), {"now": 0, "most": 0}

    def work() -> None:
        for _ in range(each):
            with turns.turn(slots):
                with lock:
                    state["now"] += 1
                    state["most"] = max(state["most"], state["now"])
                time.sleep(inside_s)
                with lock:
                    state["now"] -= 1

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    return state["most"]


def test_the_threads_of_a_process_hand_its_slot_on_without_the_server():
    limit = _Limit(delay=0.05)
    turns = GpuTurns(limit.slot, linger_s=5.0)
    assert _turns_on_threads(turns, 1, threads=8, each=5) == 1
    assert limit.acquired == 1 and limit.held == 1  # 40 turns, one acquisition; kept for the next
    turns.give_back_idle()
    assert limit.held == 0


def test_a_slot_goes_back_after_the_linger_without_a_turn():
    limit = _Limit()
    turns = GpuTurns(limit.slot, linger_s=0.05)
    with turns.turn(1):
        pass
    deadline = time.monotonic() + 5
    while limit.held and time.monotonic() < deadline:
        time.sleep(0.01)
    assert limit.held == 0
    with turns.turn(1):
        assert limit.acquired == 2 and limit.held == 1


def test_a_slot_goes_back_after_the_longest_hold_even_while_turns_wait():
    limit = _Limit()
    turns = GpuTurns(limit.slot, linger_s=5.0, max_hold_s=0.1)
    start = time.monotonic()
    assert _turns_on_threads(turns, 1, threads=3, each=40, inside_s=0.01) == 1
    held_s = time.monotonic() - start
    assert limit.acquired >= max(3, int(held_s / 0.1) // 2) and limit.most == 1


def test_the_machines_slots_bound_the_turns_of_a_process():
    limit = _Limit(size=2)
    turns = GpuTurns(limit.slot)
    assert _turns_on_threads(turns, 2, threads=6, each=5, inside_s=0.02) == 2
    assert limit.most == 2 and limit.acquired == limit.asked == 2  # no third lane queued at the server
    turns.give_back_idle()
    assert limit.held == 0


def test_a_failed_acquisition_fails_the_turn_and_the_next_one_tries_again():
    calls = []

    @contextlib.contextmanager
    def slot():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("gpu-host: no such concurrency limit")
        yield

    turns = GpuTurns(slot)
    with pytest.raises(RuntimeError, match="no such concurrency limit"), turns.turn(1):
        pass
    with turns.turn(1):
        assert len(calls) == 2


@pytest.mark.usefixtures("prefect_harness")
def test_a_process_keeps_a_prefect_slot_between_turns_and_gives_it_back_at_the_end():
    from prefect.client.orchestration import get_client

    from refany3d.flows.runtime import ensure_gpu_limit, give_back_gpu_slots, gpu_limit_name, gpu_turns

    name = gpu_limit_name()
    with get_client(sync_client=True) as client:
        existed = any(lim.name == name for lim in client.read_global_concurrency_limits())
    size = ensure_gpu_limit(name, 1)  # an earlier test may have made it with other slots
    settings = override(BuildSettings(), **{"runtime.gpu_slots": size})

    def active() -> int:
        with get_client(sync_client=True) as client:
            return client.read_global_concurrency_limit_by_name(name).active_slots

    try:
        turn = gpu_turns(settings)
        with turn():
            assert active() == 1
        assert active() == 1  # kept for this process's next turn
        with turn():
            assert active() == 1
        give_back_gpu_slots()
        assert active() == 0
    finally:
        if not existed:  # the harness is the session's: leave no limit for the tests after this one
            with get_client(sync_client=True) as client:
                client.delete_global_concurrency_limit_by_name(name)
