"""Device and precision of the perception backends, from `runtime` settings."""

from __future__ import annotations

from typing import Any

from refany3d.models._cuda_graphs import graph_modules


def torch_device_dtype(device: str, dtype: str) -> tuple[Any, Any]:
    """(torch.device, torch.dtype) to run a model in; half precision only on CUDA devices.

    CPU kernels for fp16 are slow or missing, so a `float16`/`bfloat16` request on CPU runs in float32.
    """
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return dev, torch.float32
    # The perception networks see a few fixed input sizes (SAM 1024², Depth Pro 1536², views of
    # one size): cuDNN's per-shape algorithm search pays off (Depth Pro's head picked an 8 ms/call
    # kernel without it, bench/results/perception.md).
    torch.backends.cudnn.benchmark = True
    return dev, {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def compile_layers(model: Any, layer_classes: frozenset[str], **options: Any) -> int:
    """`torch.compile` in place every submodule of `model` whose class name is in `layer_classes`;
    returns how many (`options` go to `torch.compile`). Compiling the repeated layers rather than the whole network keeps compile
    time to one graph per layer type and input shape (parameters are graph inputs, so all layers of
    a type share it) and leaves the glue between layers (Python loops, data-dependent steps) eager."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            module.compile(**options)
            count += 1
    if not count:
        raise ValueError(f"no {sorted(layer_classes)} layer in {type(model).__name__}")
    return count


def accelerate(backend: Any, compile: bool, cuda_graphs: bool) -> Any:
    """`backend` with its `compile_layers` compiled and its `graph_modules` replayed from CUDA graphs
    (refany3d.models._cuda_graphs), each when enabled and the backend runs on CUDA.

    Both are off on CPU whatever the settings: inductor's CPU code would cost minutes of compile per
    test process for little gain, and CUDA graphs exist only on CUDA. Backends without these
    attributes (truth, ...) are returned as they are.
    """
    if getattr(getattr(backend, "device", None), "type", None) != "cuda":
        return backend
    layers = getattr(backend, "compile_layers", None)
    if compile and layers:
        compile_layers(backend.model, layers)
    regions = getattr(backend, "graph_modules", None)
    if cuda_graphs and regions:
        graph_modules(backend.model, regions)
    return backend
