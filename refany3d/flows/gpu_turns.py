"""A worker process's turns on its machine's GPU limit (`runtime.gpu_slots` slots of a Prefect
global concurrency limit, one limit per machine).

Prefect hands out a slot by polling: while the limit is full, the server tells the client to retry
after the limit's mean occupancy times its waiters (Poisson-jittered, up to 30 s). A stage thread
that waits for a turn another thread of the same process holds therefore sleeps well past the
moment the slot is free, and the GPU idles meanwhile. With one slot taken per forward pass, the
build on the H200 worker ran the fast path at 709 samples/h through Prefect against 1,176 for the
same schedule without it (`bench/GPU_BUILD_RUN.md`, run 5).

So a process keeps the slots it takes. Each is held by a lane thread of its own (Prefect's context
manager is entered and left on one thread), which hands the slot from one stage thread of the
process to the next at once while turns are waiting, and gives it back to the server after
`LINGER_S` without a turn, after `MAX_HOLD_S` held (other processes on the machine then get their
chance), or when the flow ends (`give_back_idle`). At most `slots` lanes per process: the machine's
limit still bounds every process together.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

LINGER_S = 1.0  # longer than the gap between two forward passes of a stage's chunks
MAX_HOLD_S = 30.0


class GpuTurns:
    """`acquire()`: the context that holds one slot of the machine's limit (blocking until it has
    one), entered and left on a lane thread."""

    def __init__(
        self,
        acquire: Callable[[], AbstractContextManager],
        linger_s: float = LINGER_S,
        max_hold_s: float = MAX_HOLD_S,
    ) -> None:
        self._acquire, self._linger_s, self._max_hold_s = acquire, linger_s, max_hold_s
        self._cond = threading.Condition()
        self._lanes = 0  # lane threads acquiring or holding a slot
        self._acquiring = 0  # of those, the ones still waiting for the server
        self._free = 0  # slots held by lanes and in no turn
        self._returning = 0  # lanes giving their slot back to the server
        self._reclaiming = 0  # lanes past their longest hold, waiting for their slot to be free
        self._waiting = 0  # turns waiting for a slot
        self._last_turn = time.monotonic()  # when a turn last started or ended
        self._give_back = False
        self._error: BaseException | None = None

    @contextlib.contextmanager
    def turn(self, slots: int) -> Iterator[None]:
        """Hold one slot (of the machine's `slots`) for the body."""
        with self._cond:
            self._give_back = False
            self._waiting += 1
            try:
                while self._free <= self._reclaiming:
                    if self._error is not None:  # a lane could not acquire: this turn fails with it
                        error, self._error = self._error, None
                        raise error
                    if self._acquiring < self._waiting and self._lanes < slots:
                        self._start_lane()
                    self._cond.wait()
                self._free -= 1
                self._last_turn = time.monotonic()
            finally:
                self._waiting -= 1
        try:
            yield
        finally:
            with self._cond:
                self._free += 1
                self._last_turn = time.monotonic()
                self._cond.notify_all()

    def give_back_idle(self, timeout_s: float = 10.0) -> None:
        """Give every slot in no turn back to the server now, and wait until the idle lanes have."""
        with self._cond:
            self._give_back = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._lanes == self._held_in_turns() or self._waiting, timeout_s)

    def _held_in_turns(self) -> int:
        return self._lanes - self._acquiring - self._free - self._returning

    def _start_lane(self) -> None:
        self._lanes += 1
        self._acquiring += 1
        threading.Thread(target=self._lane, name="gpu-turn-lane", daemon=True).start()

    def _lane(self) -> None:
        got = False
        try:
            with self._acquire():
                got = True
                self._hold()
        except Exception as error:  # noqa: BLE001 - an acquisition's error goes to a waiting turn
            with self._cond:
                if not got:
                    self._acquiring -= 1
                    self._error = error
        finally:
            with self._cond:
                self._lanes -= 1
                self._returning -= got
                self._cond.notify_all()

    def _hold(self) -> None:
        """Lend the slot to turns until it should go back (under no lock when this returns). Past
        its longest hold, a lane takes the next slot a turn frees before any waiting turn can."""
        held_since, reclaiming = time.monotonic(), False
        with self._cond:
            self._acquiring -= 1
            self._free += 1
            self._cond.notify_all()
            while True:
                now = time.monotonic()
                idle_for = now - self._last_turn
                if not reclaiming and now - held_since >= self._max_hold_s:
                    reclaiming = True
                    self._reclaiming += 1
                idle = not self._waiting and (self._give_back or idle_for >= self._linger_s)
                if self._free and (reclaiming or idle):
                    self._free -= 1
                    self._reclaiming -= reclaiming
                    self._returning += 1
                    self._cond.notify_all()  # a waiting turn now starts a lane of its own
                    return
                timeouts = [held_since + self._max_hold_s - now]
                if not self._waiting:
                    timeouts.append(self._linger_s - idle_for)
                self._cond.wait(max(0.01, min(timeouts)) if not reclaiming else None)
