"""The two peft LoRA adapters of RefAny3D and their routing by token group.

Both adapters are ordinary peft LoRA adapters injected into the Flux transformer, so their weights
save and load in the standard peft format. peft's own forward would apply every active adapter to
every token; instead the blocks call `routed_linear`, which runs the base layer on all tokens and
each adapter only on the contiguous token slice of the groups that use it (positions.py orders the
sequence so that each adapter's groups are one slice): no zero-scaled LoRA matmuls.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from refany3d.models.flux.positions import COND_POINT_MAP, COND_RGB, TARGET_POINT_MAP, TokenLayout

REFERENCE = "reference"  # all condition tokens
DOMAIN = "domain"  # point-map tokens: point-map conditions + target point map

# DESIGN §5: x_embedder; double blocks' norm1.linear, to_q/k/v, to_out.0, ff.net.2; single blocks'
# norm.linear, proj_mlp, proj_out, to_q/k/v. A full-match regex, so the top-level proj_out is not hit.
TARGET_MODULES = (
    r"x_embedder"
    r"|transformer_blocks\.\d+\.(norm1\.linear|attn\.to_q|attn\.to_k|attn\.to_v|attn\.to_out\.0|ff\.net\.2)"
    r"|single_transformer_blocks\.\d+\.(norm\.linear|proj_mlp|proj_out|attn\.to_q|attn\.to_k|attn\.to_v)"
)

Route = tuple[str, int, int]  # (adapter, start, stop) on the token (or modulation-kind) axis


def lora_config(rank: int, alpha: float) -> LoraConfig:
    """The peft config of either adapter (rank 16, alpha 16, gaussian init in DESIGN §5)."""
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=TARGET_MODULES)


def add_adapters(flux: nn.Module, rank: int, alpha: float, domain_lora: bool) -> dict[str, LoraConfig]:
    """Inject the Reference- (and Domain-) LoRA into `flux`; freeze everything but the adapters."""
    names = (REFERENCE, DOMAIN) if domain_lora else (REFERENCE,)
    configs = {name: lora_config(rank, alpha) for name in names}
    with warnings.catch_warnings():  # peft warns on every adapter after the first; two are intended
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for name, config in configs.items():
            inject_adapter_in_model(config, flux, adapter_name=name)
    for param_name, param in flux.named_parameters():
        param.requires_grad_(any(f".{name}." in param_name for name in names) and "lora_" in param_name)
    return configs


@dataclass(frozen=True)
class LoraRoutes:
    """Which slice of each kind of input each adapter sees, for one token layout."""

    image: tuple[Route, ...]  # image tokens (x_embedder, double blocks)
    joint: tuple[Route, ...]  # text + image tokens (single blocks)
    image_kinds: tuple[Route, ...]  # the 4 image modulation kinds (double blocks' norm1.linear)
    joint_kinds: tuple[Route, ...]  # all 5 modulation kinds (single blocks' norm.linear)


def lora_routes(layout: TokenLayout, domain_lora: bool) -> LoraRoutes:
    """Routes of both adapters over the layout of positions.py (target RGB gets no adapter)."""
    rgb, cond_rgb, cond_pm, target_pm = layout.image_kind_sizes
    image = [(REFERENCE, rgb, rgb + cond_rgb + cond_pm)]
    kinds = [(REFERENCE, COND_RGB, COND_POINT_MAP + 1)]
    if domain_lora:
        image.append((DOMAIN, rgb + cond_rgb, rgb + cond_rgb + cond_pm + target_pm))
        kinds.append((DOMAIN, COND_POINT_MAP, TARGET_POINT_MAP + 1))
    image = [r for r in image if r[2] > r[1]]
    t = layout.text
    return LoraRoutes(
        image=tuple(image),
        joint=tuple((name, start + t, stop + t) for name, start, stop in image),
        image_kinds=tuple((name, start - 1, stop - 1) for name, start, stop in kinds),
        joint_kinds=tuple(kinds),
    )


def routed_linear(layer: nn.Module, x: torch.Tensor, routes: tuple[Route, ...]) -> torch.Tensor:
    """`layer(x)` for x (B, L, in) with each adapter applied only to its slice of the L axis."""
    if not isinstance(layer, LoraLayer):
        return layer(x)
    out = layer.base_layer(x)
    for name, start, stop in routes:
        if name not in layer.lora_A:
            continue
        # fp32 master weights, cast to the compute dtype (the cast is differentiable)
        down = F.linear(x[:, start:stop], layer.lora_A[name].weight.to(x.dtype))
        up = layer.lora_B[name].weight.to(x.dtype).t().expand(x.shape[0], -1, -1)
        # in place on the base output's slice: one fused multiply-add, no full-size LoRA temporary
        out[:, start:stop].baddbmm_(down, up, alpha=layer.scaling[name])
    return out
