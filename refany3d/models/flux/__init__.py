"""The RefAny3D network: dual-branch Flux with Reference-/Domain-LoRA, group attention, shared positions.

Public entry points: `load_components` (the network with VAE, text encoders, tokenizers and
scheduler; `encode_images`, `encode_prompts`, `decode_latents`), `build_model` (the network alone),
`flow_matching_loss` (with `FlowBatch`), `save_adapters`, `load_adapters`. Heavy imports (diffusers,
peft) happen when this package is imported.
"""

from __future__ import annotations

import torch

from refany3d.config import ModelSettings
from refany3d.models.flux.components import (
    FluxComponents,
    check_pretrained,
    decode_latents,
    encode_images,
    encode_prompts,
    load_components,
    tiny_flux,
    wrap_transformer,
)
from refany3d.models.flux.io import load_adapters, save_adapters
from refany3d.models.flux.loss import FlowBatch, flow_matching_loss
from refany3d.models.flux.transformer import ConditionCache, RefAny3DOutput, RefAny3DTransformer

__all__ = [
    "ConditionCache",
    "FluxComponents",
    "FlowBatch",
    "RefAny3DOutput",
    "RefAny3DTransformer",
    "build_model",
    "decode_latents",
    "encode_images",
    "encode_prompts",
    "load_components",
    "flow_matching_loss",
    "load_adapters",
    "save_adapters",
]


def build_model(
    settings: ModelSettings, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> RefAny3DTransformer:
    """The RefAny3D network alone: FLUX.1-dev's transformer from `settings.pretrained`, or the tiny
    fixed-seed random Flux of the embedded default when it is empty (see components.py)."""
    from diffusers import FluxTransformer2DModel

    if settings.pretrained:
        root = check_pretrained(settings.pretrained)
        flux = FluxTransformer2DModel.from_pretrained(root / "transformer", torch_dtype=dtype)
    else:
        flux = tiny_flux()
    return wrap_transformer(flux.to(device=device, dtype=dtype), settings)
