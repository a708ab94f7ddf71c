"""Preview images during training: a few samples denoised with the current adapters.

The flow-matching Euler sampler of FluxPipeline (the scheduler's shifted sigmas, `mu` from the
image token count, guidance embedding), run jointly on the target RGB and point-map latents with the
references and caption of fixed dataset samples; decoded with the VAE into a PNG strip per step
(per sample: reference view 0 | generated RGB | generated point map).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from refany3d.models.flux.components import FluxComponents, decode_latents
from refany3d.models.flux.loss import FlowBatch


def _shift_mu(scheduler, tokens: int) -> float:
    """FluxPipeline's `calculate_shift`: mu linear in the image token count."""
    cfg = scheduler.config
    slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    return tokens * slope + cfg.base_shift - slope * cfg.base_image_seq_len


@torch.no_grad()
def denoise(
    components: FluxComponents, batch: FlowBatch, steps: int, guidance: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Packed target latents (B, Lt, C) of RGB (and point map) sampled from noise given `batch`'s
    text and references (its targets are ignored)."""
    model, scheduler = components.transformer, components.scheduler
    shape = batch.target_rgb.shape
    both = batch.target_point_map is not None
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((shape[0], shape[1] * (2 if both else 1), shape[2]), generator=g)
    x = x.to(batch.target_rgb.device, batch.target_rgb.dtype)
    scheduler.set_timesteps(steps, mu=_shift_mu(scheduler, shape[1]), device=x.device)
    gvec = torch.full((shape[0],), guidance, device=x.device) if model.flux.config.guidance_embeds else None
    for t in scheduler.timesteps:
        rgb, pm = (x[:, : shape[1]], x[:, shape[1] :]) if both else (x, None)
        out = model(
            target_rgb=rgb,
            target_point_map=pm,
            encoder_hidden_states=batch.text,
            pooled_projections=batch.pooled,
            timestep=(t / 1000).expand(shape[0]).to(x.dtype),
            target_size=batch.target_size,
            cond_rgb=batch.cond_rgb,
            cond_point_map=batch.cond_point_map,
            cond_size=batch.cond_size,
            guidance=gvec,
        )
        v = torch.cat([out.rgb, out.point_map], dim=1) if both else out.rgb
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return (x[:, : shape[1]], x[:, shape[1] :]) if both else (x, None)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def preview_png(
    components: FluxComponents,
    batch: FlowBatch,
    references: torch.Tensor,
    steps: int,
    guidance: float,
    seed: int,
) -> bytes:
    """PNG of one row per sample: reference view 0 (B, 3, H, W in [-1, 1]) | RGB | point map."""
    rgb, pm = denoise(components, batch, steps, guidance, seed)
    columns = [_to_uint8(references), _to_uint8(decode_latents(components, rgb, batch.target_size))]
    if pm is not None:
        columns.append(_to_uint8(decode_latents(components, pm, batch.target_size)))
    size = columns[1].shape[1]
    columns[0] = np.stack([np.asarray(Image.fromarray(r).resize((size, size))) for r in columns[0]])
    grid = np.concatenate([np.concatenate(list(col), axis=0) for col in columns], axis=1)
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return buf.getvalue()
