"""Replay a submodule's forward pass from CUDA graphs, one graph per input signature.

At small batches the perception networks are launch-bound: GroundingDINO at batch 1 issues a few
thousand small kernels, each costing more host time to launch than device time to run (72 ms of
model time at batch 1 against 14.5 ms per image at batch 8 on an H100, bench/results/perception.md).
A CUDA graph launches a captured sequence of kernels with one call. The forward of a module is
captured once per input signature (tensor shapes/dtypes and the other arguments' values) and then
replayed: inputs are copied into the graph's own input tensors, outputs are copied out, so callers
see fresh tensors exactly as from the eager forward.

A region can only be captured when it never waits for the device (no `.item()`, no data-dependent
shapes, no host-to-device copies of new constants); such steps stay in the eager glue between the
graphed regions, which is why backends name regions (`graph_modules`) rather than graphing the
whole network. A region that waits for the device, found in its warm-up, runs eagerly from then
on, with a warning.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

from refany3d.models._device_lock import DEVICE_LOCK

log = logging.getLogger(__name__)


class GraphedForward:
    """Callable replacing `module.forward`: eager when autograd is on, an input is not a CUDA
    tensor or an argument is unhashable; otherwise replayed from the graph of the call's signature,
    keeping the `max_graphs` most recently used (one memory pool shared by them). Captures and
    replays hold `DEVICE_LOCK`: a graph's input and output tensors serve one call at a time."""

    def __init__(self, forward: Any, name: str, max_graphs: int = 8, warmup: int = 2) -> None:
        self.forward = forward
        self.name = name
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.graphs: OrderedDict[tuple, _Graph | None] = OrderedDict()
        self._pool = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch
        from torch.utils._pytree import tree_flatten

        leaves, spec = tree_flatten((args, kwargs))
        key = _signature(leaves, spec)
        if key is None or torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        with DEVICE_LOCK:
            return self._replay(key, leaves, spec, args, kwargs)

    def _replay(self, key: tuple, leaves: list, spec: Any, args: tuple, kwargs: dict) -> Any:
        if key not in self.graphs:
            self.graphs[key] = self._capture(leaves, spec)
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        graph = self.graphs[key]
        if graph is None:  # not capturable with this signature
            return self.forward(*args, **kwargs)
        return graph.replay(leaves)

    def _capture(self, leaves: list, spec: Any) -> _Graph | None:
        import torch
        from torch.utils._pytree import tree_unflatten

        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # The graph reads its inputs from these tensors (outside the pool, alive as long as the graph).
        static = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        args, kwargs = tree_unflatten(static, spec)
        # Warm-up on a side stream (cuDNN autotuning, lazy initialisation, compiling compiled
        # layers), as torch.cuda.graph requires; the last run with synchronisation as an error, so a
        # region that waits for the device is found before a capture fails (a failed capture can
        # leave the CUDA random generator unusable).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup - 1):
                self.forward(*args, **kwargs)
            reason = _synchronises(self.forward, args, kwargs)
        torch.cuda.current_stream().wait_stream(side)
        if reason:
            log.warning("%s: not captured in a CUDA graph, runs eagerly: %s", self.name, reason)
            return None
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = self.forward(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - last resort; the warm-up check catches device reads
            torch.cuda.synchronize()
            log.warning("%s: CUDA graph capture failed, runs eagerly: %s", self.name, err)
            return None
        return _Graph(graph, static, outputs)


def _synchronises(forward: Any, args: tuple, kwargs: dict) -> str:
    """Where `forward(*args, **kwargs)` waits for the device ('' if it never does): `.item()`,
    data-dependent shapes, copies of new host values to the device. None of these can be captured."""
    import traceback

    import torch

    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        forward(*args, **kwargs)
    except RuntimeError as err:
        frames = traceback.extract_tb(err.__traceback__)[-3:]
        return f"{str(err).splitlines()[0]} at " + " <- ".join(
            f"{Path(f.filename).name}:{f.lineno} {f.line}" for f in reversed(frames)
        )
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return ""


class _Graph:
    def __init__(self, graph: Any, static: list, outputs: Any) -> None:
        self.graph = graph
        self.static = static
        self.outputs = outputs

    def replay(self, leaves: list) -> Any:
        import torch
        from torch.utils._pytree import tree_map

        for dst, src in zip(self.static, leaves, strict=True):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        self.graph.replay()
        # Copied out: the next replay overwrites the graph's own output tensors.
        return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, self.outputs)


def _signature(leaves: list, spec: Any) -> tuple | None:
    """Hashable description of a call's inputs (None: not capturable)."""
    import torch

    key: list = [spec]
    for x in leaves:
        if isinstance(x, torch.Tensor):
            if x.device.type != "cuda":
                return None
            key.append((tuple(x.shape), x.dtype, x.device, tuple(x.stride())))
        else:
            try:
                hash(x)
            except TypeError:
                return None
            key.append((type(x), x))
    return tuple(key)


def graph_modules(model: Any, names: frozenset[str], **options: Any) -> int:
    """Replace the forward of each submodule of `model` named in `names` (dotted paths, as from
    `named_modules`) by a `GraphedForward`; returns how many."""
    modules = dict(model.named_modules())
    missing = sorted(names - modules.keys())
    if missing:
        raise ValueError(f"no submodule {missing} in {type(model).__name__}")
    for name in names:
        module = modules[name]
        module.forward = GraphedForward(module.forward, f"{type(model).__name__}.{name}", **options)
    return len(names)
