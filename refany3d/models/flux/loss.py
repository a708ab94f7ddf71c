"""Flow-matching loss of RefAny3D on both targets (DESIGN §5)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from refany3d.models.flux.transformer import RefAny3DTransformer


@dataclass(frozen=True)
class FlowBatch:
    """One training batch of packed VAE latents (see transformer.RefAny3DTransformer.forward).

    target_rgb / target_point_map: (B, Lt, C) clean latents x0 (point map None when the branch is off);
    cond_rgb / cond_point_map: (B, N, Lc, C) clean condition latents or None;
    text: (B, T, joint_attention_dim); pooled: (B, pooled_projection_dim);
    target_size / cond_size: (h, w) of the packed latent grids.
    """

    target_rgb: torch.Tensor
    text: torch.Tensor
    pooled: torch.Tensor
    target_size: tuple[int, int]
    target_point_map: torch.Tensor | None = None
    cond_rgb: torch.Tensor | None = None
    cond_point_map: torch.Tensor | None = None
    cond_size: tuple[int, int] | None = None


def flow_matching_loss(
    model: RefAny3DTransformer,
    batch: FlowBatch,
    generator: torch.Generator | None = None,
    noise: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """The sum of `flow_matching_losses` (RGB + point map, weight 1 each)."""
    return sum(flow_matching_losses(model, batch, generator, noise))


def flow_matching_losses(
    model: RefAny3DTransformer,
    batch: FlowBatch,
    generator: torch.Generator | None = None,
    noise: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
) -> list[torch.Tensor]:
    """[MSE(v, eps - x0) of the target RGB, and of the target point map when the branch is on].

    t = sigmoid(N(0, 1)) per sample, shared by both targets; x_t = (1 - t) x0 + t eps; the
    conditions stay clean (t = 0 inside the model); guidance embedding 1 when the model has one.
    `noise` = (t (B,), [eps per target]) given by the caller (per-sample seeded draws in training)
    replaces the draws from `generator`. `model` may be wrapped (DDP): `.module` is looked through.
    """
    x0 = batch.target_rgb
    b, device = x0.shape[0], x0.device
    targets = [x0] + ([batch.target_point_map] if batch.target_point_map is not None else [])
    if noise is None:
        t = torch.sigmoid(torch.randn(b, generator=generator, device=device, dtype=torch.float32))
        noises = [torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype) for x in targets]
    else:
        t, noises = noise
    tt = t.to(x0.dtype)[:, None, None]
    noisy = [(1 - tt) * x + tt * eps for x, eps in zip(targets, noises)]
    flux = getattr(model, "module", model).flux
    guidance = torch.ones(b, device=device) if flux.config.guidance_embeds else None
    out = model(
        target_rgb=noisy[0],
        target_point_map=noisy[1] if len(noisy) > 1 else None,
        encoder_hidden_states=batch.text,
        pooled_projections=batch.pooled,
        timestep=t.to(x0.dtype),
        target_size=batch.target_size,
        cond_rgb=batch.cond_rgb,
        cond_point_map=batch.cond_point_map,
        cond_size=batch.cond_size,
        guidance=guidance,
    )
    preds = [out.rgb] + ([out.point_map] if out.point_map is not None else [])
    return [F.mse_loss(v.float(), (eps - x).float()) for v, eps, x in zip(preds, noises, targets)]
