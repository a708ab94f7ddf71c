"""The process's one device lock, the floor below `_torch` and `_cuda_graphs` (both hold it)."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

# One batch on the GPU at a time per process. A flow may run two GPU stage tasks in one process
# (`runtime.gpu_slots` > 1 with the thread runner): two forward passes at once gain nothing on a
# busy GPU, break compiled layers (dynamo) and would race on a CUDA graph's input tensors, and a
# graph's warm-up treats any device read in the process as an error while it runs.
DEVICE_LOCK = threading.RLock()


def holds_device_lock(method: F) -> F:
    """Run a backend method holding `DEVICE_LOCK` when the backend (`self.device`) is on CUDA."""

    @functools.wraps(method)
    def locked(self, *args: Any, **kwargs: Any) -> Any:
        if self.device.type != "cuda":
            return method(self, *args, **kwargs)
        with DEVICE_LOCK:
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]
