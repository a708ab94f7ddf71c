"""Device and precision of the perception backends, from `runtime` settings."""

from __future__ import annotations

from typing import Any


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


def maybe_compile(backend: Any, enabled: bool) -> Any:
    """`backend` with its `compile_layers` compiled when `enabled` and it runs on CUDA.

    Off on CPU whatever the setting: inductor's CPU code would cost minutes of compile per test
    process for little gain. Backends without `compile_layers` (truth, ...) are returned as they are.
    """
    layers = getattr(backend, "compile_layers", None)
    device = getattr(backend, "device", None)
    if enabled and layers and getattr(device, "type", None) == "cuda":
        compile_layers(backend.model, layers)
    return backend
