"""Flow-matching Euler sampler of RefAny3D: noise -> target RGB and point-map latents (DESIGN §5).

The model predicts v = eps - x0 at x_t = (1 - t) x0 + t eps, so an Euler step from t to t' is
x_t' = x_t + (t' - t) v. Steps follow FLUX.1-dev's schedule: t linear from 1 to 1/steps, shifted
towards 1 by mu, which grows with the number of target tokens (`flux_timesteps`). Guidance 3.5 is
FLUX.1-dev's guidance embedding (the distilled model has no second pass for it). Image guidance S
(optional) adds a pass with blank references (`blank`: `components.blank_references`, what training's
reference dropout puts in): v = v_blank + S (v_ref - v_blank); S = 1 is off.

With independent conditions (`RefAny3DTransformer.independent_conditions`) the condition tokens'
keys and values are computed once per image and reused by every step (`cache_conditions`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from refany3d.models.flux.transformer import RefAny3DTransformer
from refany3d.models.sdpa import attention_kernels

# FLUX.1-dev's scheduler config: shift 0.5 at 256 image tokens, 1.15 at 4096, linear in between.
BASE_TOKENS, MAX_TOKENS, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15


@dataclass(frozen=True)
class Conditions:
    """Encoded reference views: rgb / point_map (B, N, Lc, C) packed clean latents (point_map None
    without the point-map branch); size (h, w) of one view's packed latent grid."""

    rgb: torch.Tensor
    point_map: torch.Tensor | None
    size: tuple[int, int]


@dataclass(frozen=True)
class SampledLatents:
    """rgb / point_map: (B, Lt, C) packed latents at t = 0 (point_map None without the branch)."""

    rgb: torch.Tensor
    point_map: torch.Tensor | None


def flux_timesteps(steps: int, image_tokens: int) -> torch.Tensor:
    """(steps + 1,) float64 timesteps from 1 down to 0, FLUX.1-dev's shifted schedule."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_TOKENS - BASE_TOKENS)
    mu = BASE_SHIFT + slope * (image_tokens - BASE_TOKENS)
    t = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    t = math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))
    return torch.cat([t, t.new_zeros(1)])


class _Velocity:
    """v(x_t, t) of one image batch: fixed text, conditions (or their caches) and guidance."""

    def __init__(
        self,
        model: RefAny3DTransformer,
        text: torch.Tensor,
        pooled: torch.Tensor,
        conditions: Conditions | None,
        target_size: tuple[int, int],
        guidance: float,
        cache_conditions: bool,
    ):
        self.model, self.text, self.pooled, self.target_size = model, text, pooled, target_size
        b, device = text.shape[0], text.device
        self.guidance = (
            torch.full((b,), guidance, device=device) if model.flux.config.guidance_embeds else None
        )
        self.conditions = conditions
        self.cache = None
        if conditions is not None and cache_conditions and model.independent_conditions:
            self.cache = model.encode_conditions(
                conditions.rgb, conditions.point_map, conditions.size, target_size, pooled, self.guidance
            )

    def __call__(self, rgb: torch.Tensor, point_map: torch.Tensor | None, t: float):
        timestep = torch.full((rgb.shape[0],), t, device=rgb.device, dtype=rgb.dtype)
        cond = None if self.cache is not None else self.conditions
        out = self.model(
            target_rgb=rgb,
            target_point_map=point_map,
            encoder_hidden_states=self.text,
            pooled_projections=self.pooled,
            timestep=timestep,
            target_size=self.target_size,
            cond_rgb=None if cond is None else cond.rgb,
            cond_point_map=None if cond is None else cond.point_map,
            cond_size=None if cond is None else cond.size,
            guidance=self.guidance,
            conditions=self.cache,
        )
        return out.rgb, out.point_map


def sampling_kernels(model: RefAny3DTransformer, text: torch.Tensor, conditions, target_size):
    """The SDPA kernel context (refany3d.models.sdpa) of one denoising pass: all its tokens (text,
    targets, references) attend in its largest call."""
    groups = 2 if model.point_map_branch else 1
    tokens = text.shape[1] + groups * target_size[0] * target_size[1]
    if conditions is not None:
        tokens += sum(
            c.shape[1] * c.shape[2] for c in (conditions.rgb, conditions.point_map) if c is not None
        )
    head_dim = model.flux.config.attention_head_dim
    return attention_kernels(head_dim, text.dtype, tokens, tokens, text.device)


def sample_latents(
    model: RefAny3DTransformer,
    text: torch.Tensor,
    pooled: torch.Tensor,
    conditions: Conditions | None,
    target_size: tuple[int, int],
    steps: int = 28,
    guidance: float = 3.5,
    image_guidance: float = 1.0,
    generator: torch.Generator | None = None,
    cache_conditions: bool = True,
    blank: Conditions | None = None,
) -> SampledLatents:
    """Denoise the targets from seeded noise in `steps` Euler steps.

    text (B, T, joint_attention_dim), pooled (B, pooled_projection_dim): the encoded prompt;
    conditions: the encoded references (None = unconditioned); target_size (h, w) of the packed
    target grid; generator: seeds the initial noise (drawn on its device, then moved; one image
    after the other, its RGB then its point map, so image k's noise does not depend on B); blank:
    the blank references of the image-guidance pass (needed when image_guidance != 1).
    """
    guided = conditions is not None and image_guidance != 1.0
    if guided and blank is None:
        raise ValueError("image_guidance != 1 needs the blank references (components.blank_references)")
    b, device, dtype = text.shape[0], text.device, text.dtype
    shape = (b, target_size[0] * target_size[1], model.flux.config.in_channels)
    gen_device = generator.device if generator is not None else "cpu"
    # image by image, RGB then point map: image k starts from the same noise whatever the batch size
    groups = 2 if model.point_map_branch else 1
    noise = [
        [torch.randn(shape[1:], generator=generator, device=gen_device) for _ in range(groups)]
        for _ in range(b)
    ]
    rgb = torch.stack([n[0] for n in noise]).to(device, dtype)
    pm = torch.stack([n[1] for n in noise]).to(device, dtype) if model.point_map_branch else None
    with torch.no_grad(), sampling_kernels(model, text, conditions, target_size):
        velocity = _Velocity(model, text, pooled, conditions, target_size, guidance, cache_conditions)
        unconditional = None
        if guided:
            unconditional = _Velocity(model, text, pooled, blank, target_size, guidance, cache_conditions)
        times = flux_timesteps(steps, shape[1]).tolist()
        for t, t_next in zip(times[:-1], times[1:]):
            v_rgb, v_pm = velocity(rgb, pm, t)
            if unconditional is not None:
                b_rgb, b_pm = unconditional(rgb, pm, t)
                v_rgb = b_rgb + image_guidance * (v_rgb - b_rgb)
                v_pm = None if pm is None else b_pm + image_guidance * (v_pm - b_pm)
            rgb = rgb + (t_next - t) * v_rgb
            if pm is not None:
                pm = pm + (t_next - t) * v_pm
    return SampledLatents(rgb=rgb, point_map=pm)
