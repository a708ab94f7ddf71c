"""Which SDPA kernel an attention shape runs, from a table measured on the GPU.

PyTorch's `scaled_dot_product_attention` tries its kernels in one priority order (below: which
one depends on the device and on the process's first call). On Hopper, cuDNN is faster for some
shapes (head dim 64 in fp16, the Hunyuan3D decoder's: 452 vs 309 TFLOP/s) and not for others. `bench/sdpa_bench.py` times every kernel on the shapes our networks
run (Hunyuan3D's DiT and decoder, DINOv2, Depth Pro, BERT, Flux sampling and training), checks each
kernel's output against fp32 math attention, and writes `sdpa_table.json` beside this file: per
device (name, compute capability) and shape, the fastest kernel whose error is
within `TOLERANCE`.

`attention_kernels(head_dim, dtype, queries, keys, device)` is the context a network's forward runs in:
on a CUDA device the table covers, the nearest measured shape's kernel first, then `DEFAULT_ORDER`
(flash, memory-efficient, math, cuDNN; where the first refuses a shape, the next takes it); on
the CPU, nothing; on an unmeasured CUDA device, PyTorch's own order. Compiled graphs take the
kernel chosen while they are traced: hold the context around every call of a compiled model.

PyTorch's own order is not one order. Its list is flash, memory-efficient, math, cuDNN, but on
Hopper and Blackwell (compute capability 9.0 / 10.0) with a recent cuDNN its first SDPA call of
the process moves cuDNN to the front, unless that first call runs inside an explicit priority
context, whose exit puts the list back. So the order a call gets without a context depends on
which call came first; the contexts here always set the order they mean.

A call site whose shapes change from call to call (FlashVDM's ragged chunks: a different query
count for every grid cell and every object) says so (`shapes_vary`), and then a kernel that plans
per shape is never first, on any CUDA device, measured or not: cuDNN builds an execution graph for
each new shape and caches it per thread, tens of milliseconds of host time each, while the GPU
waits. On the H200 worker that was 13-17 s of idle GPU on a thread's first object
(`bench/GPU_BUILD_RUN.md`, run 5), and on the H100, which the table did not cover, most of the
fast path's wall (runs 7 and 8); the table's fixed-shape timing cannot show it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from pathlib import Path
from typing import Any

TABLE = Path(__file__).with_name("sdpa_table.json")
DEFAULT_ORDER = ("flash", "efficient", "math", "cudnn")  # PyTorch's listed priority (cuDNN last)
PLANNED_PER_SHAPE = ("cudnn",)  # kernels that build (and cache, per thread) a plan for each new shape
# Largest max |kernel - fp32 math| / max |fp32 math| a kernel may have to be chosen.
TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-4}


def load_table() -> tuple[dict[str, Any], ...]:
    """The measured rows of `TABLE` (`bench/sdpa_bench.py`); none when the file is missing."""
    return _read_table(str(TABLE))


@functools.cache
def _read_table(path: str) -> tuple[dict[str, Any], ...]:
    if not Path(path).is_file():
        return ()
    return tuple(json.loads(Path(path).read_text())["rows"])


def _device_key(device: Any) -> tuple[str, tuple[int, int]] | None:
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(device), tuple(torch.cuda.get_device_capability(device))


def chosen_kernel(
    rows: tuple[dict[str, Any], ...],
    device: tuple[str, tuple[int, int]],
    head_dim: int,
    dtype: str,
    queries: int,
    keys: int,
    backward: bool = False,
) -> str | None:
    """The kernel of the measured row of this device (name, capability), head dim, dtype and pass
    whose query and key counts are nearest (log scale) to `queries` / `keys`; None when no row
    matches."""
    name, capability = device
    same = [
        r
        for r in rows
        if r["device"] == name
        and tuple(r["capability"]) == tuple(capability)
        and r["head_dim"] == head_dim
        and r["dtype"] == dtype
        and r["backward"] == backward
        and r.get("best")
    ]
    if not same:
        return None

    def distance(row: dict[str, Any]) -> float:
        return abs(math.log(row["queries"] / queries)) + abs(math.log(row["keys"] / keys))

    return min(same, key=distance)["best"]


def kernel_order(first: str | None) -> tuple[str, ...]:
    """`first`, then PyTorch's order without it (the fallback where `first` refuses a shape)."""
    if first is None:
        return DEFAULT_ORDER
    return (first, *(k for k in DEFAULT_ORDER if k != first))


def attention_kernels(
    head_dim: int,
    dtype: Any,
    queries: int,
    keys: int,
    device: Any,
    backward: bool = False,
    shapes_vary: bool = False,
) -> contextlib.AbstractContextManager:
    """The context in which SDPA of this shape (`queries` / `keys`: tokens of one call, a guide to
    the nearest measured row) runs the table's kernel first. Where `shapes_vary`, `DEFAULT_ORDER`
    (a per-shape planned kernel last) instead of a planned kernel or PyTorch's own order. Where
    nothing is measured and the shapes are fixed, PyTorch's own order; on the CPU, a no-op."""
    key = _device_key(device)
    if key is None:
        return contextlib.nullcontext()
    dtype_name = str(dtype).removeprefix("torch.")
    first = chosen_kernel(load_table(), key, head_dim, dtype_name, max(queries, 1), max(keys, 1), backward)
    if shapes_vary and (first is None or first in PLANNED_PER_SHAPE):
        return sdpa_order(DEFAULT_ORDER)
    if first is None:
        return contextlib.nullcontext()
    return sdpa_order(kernel_order(first))  # even flash: PyTorch's own order may put cuDNN first


def sdpa_order(order: tuple[str, ...]) -> contextlib.AbstractContextManager:
    """`torch.nn.attention.sdpa_kernel` with these kernels in this priority."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    return sdpa_kernel([backends[k] for k in order], set_priority=True)
