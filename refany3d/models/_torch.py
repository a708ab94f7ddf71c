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
    return dev, {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
