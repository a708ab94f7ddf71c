"""The RefAny3D network: dual-branch Flux with Reference-/Domain-LoRA, group attention, shared positions.

Public entry points: `build_model`, `flow_matching_loss` (with `FlowBatch`), `save_adapters`,
`load_adapters`. Heavy imports (diffusers, peft) happen when this package is imported.
"""

from __future__ import annotations

import torch

from refany3d.config import ModelSettings
from refany3d.models.flux.io import load_adapters, save_adapters
from refany3d.models.flux.loss import FlowBatch, flow_matching_loss
from refany3d.models.flux.transformer import (
    TINY_FLUX_CONFIG,
    ConditionCache,
    RefAny3DOutput,
    RefAny3DTransformer,
)

__all__ = [
    "ConditionCache",
    "FlowBatch",
    "RefAny3DOutput",
    "RefAny3DTransformer",
    "build_model",
    "flow_matching_loss",
    "load_adapters",
    "save_adapters",
]


def build_model(
    settings: ModelSettings, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> RefAny3DTransformer:
    """A RefAny3D model: FLUX.1-dev from `settings.pretrained`, or a tiny random Flux when `tiny`."""
    from diffusers import FluxTransformer2DModel

    if settings.tiny or not settings.pretrained:
        flux = FluxTransformer2DModel(**TINY_FLUX_CONFIG)
    else:
        flux = FluxTransformer2DModel.from_pretrained(
            settings.pretrained, subfolder="transformer", torch_dtype=dtype
        )
    flux = flux.to(device=device, dtype=dtype)
    return RefAny3DTransformer(
        flux,
        lora_rank=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        shared_positions=settings.shared_positions,
        text_agnostic=settings.text_agnostic,
        domain_lora=settings.domain_lora,
        point_map_branch=settings.point_map_branch,
        attention=settings.attention,
        gradient_checkpointing=settings.gradient_checkpointing,
        checkpoint_saves_attention=settings.checkpoint_saves_attention,
        compile_blocks=settings.compile_blocks,
        independent_conditions=settings.independent_conditions,
    )
