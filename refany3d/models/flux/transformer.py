"""RefAny3D: a dual-branch Flux transformer with Reference-/Domain-LoRA and group attention.

Reading order as in diffusers' transformer_flux.py: the attention processor, the two block types,
the domain switcher, then the model. The blocks reuse the modules of an unchanged
`FluxTransformer2DModel` (so FLUX.1-dev weights load as they are) and differ from Flux in three
places: AdaLN modulation is per token group (5 kinds, positions.py), the adapters are routed by
token group (lora.py), and attention follows the group rule (attention.py).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from refany3d.models.flux.attention import AttentionKind, ConditionKV, GroupAttention
from refany3d.models.flux.fp8 import convert_base_to_float8, float8_unsupported
from refany3d.models.flux.lora import LoraRoutes, Route, add_adapters, lora_routes, routed_linear
from refany3d.models.flux.positions import TEXT, TokenLayout, token_ids

logger = logging.getLogger("refany3d.models.flux")

# diffusers' own tiny Flux test config, with 64 input channels (packed 16-channel VAE latents).
TINY_FLUX_CONFIG = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 4,  # inner 64 >= the 64 output channels: the frozen proj_out is not a bottleneck
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": (4, 4, 8),
}


# --------------------------------------------------------------------------- attention processor


class GroupAttnProcessor:
    """Flux attention with group-routed LoRA on the projections and the group attention rule.

    Called by the blocks below with the pass's `GroupAttention` and LoRA routes as explicit arguments.
    """

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor],
        attention: GroupAttention,
        routes: tuple[Route, ...],
        conditions: ConditionKV | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """hidden_states (B, L, C) image tokens (double block) or text + image (single block);
        conditions: this block's cached condition keys/values (see `ConditionCache`)."""

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(heads(routed_linear(attn.to_q, hidden_states, routes)))
        key = attn.norm_k(heads(routed_linear(attn.to_k, hidden_states, routes)))
        value = heads(routed_linear(attn.to_v, hidden_states, routes))
        if encoder_hidden_states is not None:
            query = torch.cat(
                [attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states))), query], dim=1
            )
            key = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states))), key], dim=1)
            value = torch.cat([heads(attn.add_v_proj(encoder_hidden_states)), value], dim=1)
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = attention(query, key, value, conditions).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        text_len = encoder_hidden_states.shape[1]
        image_out = routed_linear(attn.to_out[0], out[:, text_len:], routes)
        return image_out, attn.to_add_out(out[:, :text_len])


# --------------------------------------------------------------------------- per-group modulation


def _modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, sizes: tuple[int, ...]
) -> torch.Tensor:
    """x * (1 + scale_g) + shift_g on each group's slice; x (B, L, C), shift/scale (B, G, C)."""
    parts = [
        torch.addcmul(shift[:, g : g + 1], part, 1 + scale[:, g : g + 1])
        for g, part in enumerate(x.split(sizes, dim=1))
        if sizes[g]
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _gated_residual(
    residual: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, sizes: tuple[int, ...]
) -> torch.Tensor:
    """residual + gate_g * x on each group's slice."""
    parts = [
        torch.addcmul(res, part, gate[:, g : g + 1])
        for g, (res, part) in enumerate(zip(residual.split(sizes, dim=1), x.split(sizes, dim=1)))
        if sizes[g]
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


# --------------------------------------------------------------------------- blocks


def double_block_forward(
    block: nn.Module,
    processor: GroupAttnProcessor,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    emb: torch.Tensor,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor],
    attention: GroupAttention,
    routes: LoraRoutes,
    conditions: ConditionKV | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A `FluxTransformerBlock` with per-kind modulation; emb (B, 5, C) is one AdaLN input per kind."""
    sizes = attention.layout.image_kind_sizes
    mod = routed_linear(block.norm1.linear, F.silu(emb[:, TEXT + 1 :]), routes.image_kinds)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context.linear(
        F.silu(emb[:, TEXT])
    )[:, None].chunk(6, dim=-1)

    norm_hidden = _modulate(block.norm1.norm(hidden_states), shift_msa, scale_msa, sizes)
    norm_text = torch.addcmul(c_shift_msa, block.norm1_context.norm(encoder_hidden_states), 1 + c_scale_msa)
    attn_out, text_attn_out = processor(
        block.attn, norm_hidden, norm_text, image_rotary_emb, attention, routes.image, conditions
    )

    hidden_states = _gated_residual(hidden_states, attn_out, gate_msa, sizes)
    norm_hidden = _modulate(block.norm2(hidden_states), shift_mlp, scale_mlp, sizes)
    ff_out = routed_linear(block.ff.net[2], block.ff.net[0](norm_hidden), routes.image)
    hidden_states = _gated_residual(hidden_states, ff_out, gate_mlp, sizes)

    encoder_hidden_states = torch.addcmul(encoder_hidden_states, text_attn_out, c_gate_msa)
    norm_text = torch.addcmul(c_shift_mlp, block.norm2_context(encoder_hidden_states), 1 + c_scale_mlp)
    encoder_hidden_states = torch.addcmul(encoder_hidden_states, block.ff_context(norm_text), c_gate_mlp)
    return hidden_states, encoder_hidden_states


def single_block_forward(
    block: nn.Module,
    processor: GroupAttnProcessor,
    hidden_states: torch.Tensor,
    emb: torch.Tensor,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor],
    attention: GroupAttention,
    routes: LoraRoutes,
    conditions: ConditionKV | None = None,
) -> torch.Tensor:
    """A `FluxSingleTransformerBlock` over the joint text + image sequence with per-kind modulation."""
    sizes = attention.layout.kind_sizes
    shift, scale, gate = routed_linear(block.norm.linear, F.silu(emb), routes.joint_kinds).chunk(3, dim=-1)
    norm_hidden = _modulate(block.norm.norm(hidden_states), shift, scale, sizes)
    mlp = block.act_mlp(routed_linear(block.proj_mlp, norm_hidden, routes.joint))
    attn_out = processor(block.attn, norm_hidden, None, image_rotary_emb, attention, routes.joint, conditions)
    out = routed_linear(block.proj_out, torch.cat([attn_out, mlp], dim=2), routes.joint)
    return _gated_residual(hidden_states, out, gate, sizes)


def _fp8_or_warn(param: torch.Tensor) -> bool:
    """Whether the base on `param`'s device can run in FP8; where not, one warning line says why."""
    reason = float8_unsupported(param.device)
    if reason:
        dtype = str(param.dtype).removeprefix("torch.")
        logger.warning("model.fp8_base: %s; the frozen base stays in %s", reason, dtype)
    return reason is None


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


# --------------------------------------------------------------------------- domain switcher


class DomainSwitcher(nn.Module):
    """Per-domain embedding added to an image group's timestep embedding (0 = RGB, 1 = point map).

    Embedding(2, 256) -> Linear(256, inner) -> SiLU -> Linear(inner, inner), the last zero-initialised
    so that the untrained model equals Flux.
    """

    def __init__(self, inner_dim: int, embedding_dim: int = 256):
        super().__init__()
        self.embedding = nn.Embedding(2, embedding_dim)
        self.linear_1 = nn.Linear(embedding_dim, inner_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(inner_dim, inner_dim)
        nn.init.zeros_(self.linear_2.weight)
        nn.init.zeros_(self.linear_2.bias)

    def forward(self, domain: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.embedding(domain))))


# --------------------------------------------------------------------------- checkpointing


def _attention_ops() -> frozenset:
    aten = torch.ops.aten
    names = (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    return frozenset(getattr(aten, name).default for name in names if hasattr(aten, name))


_ATTENTION_OPS = _attention_ops()


def _save_attention_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep SDPA outputs (and their logsumexp) for backward; recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _save_attention_context():
    return create_selective_checkpoint_contexts(_save_attention_policy)


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ConditionCache:
    """Keys and values of the condition tokens in every block, computed once per image.

    Valid only with independent conditions (condition tokens attend to their own view pair only):
    then they depend on the clean condition latents, the pooled text embedding and the guidance, and
    on nothing that changes from one denoising step to the next. keys / values: one (B, Lcond, H, D)
    tensor per block (double blocks, then single blocks), after the q/k norms and RoPE; Lcond is
    2 N Lc (N Lc without the point-map branch).
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    def block(self, index: int) -> ConditionKV:
        return self.keys[index], self.values[index]


class _KeyValueRecorder:
    """A `GroupAttention` that keeps each call's keys and values (one call per block, in order)."""

    def __init__(self, attention: GroupAttention):
        self.attention = attention
        self.layout = attention.layout
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def __call__(self, query, key, value, conditions=None):
        self.keys.append(key)
        self.values.append(value)
        return self.attention(query, key, value, conditions)


@dataclass(frozen=True)
class RefAny3DOutput:
    rgb: torch.Tensor  # (B, Lt, C_out) velocity of the target RGB latents
    point_map: torch.Tensor | None  # (B, Lt, C_out) velocity of the target point-map latents


class RefAny3DTransformer(nn.Module):
    """Dual-branch Flux: jointly denoises a target RGB and point map from N posed reference views.

    Args:
        flux: an unchanged `FluxTransformer2DModel` (FLUX.1-dev or a tiny random one); adapters are
            injected into it in place.
        lora_rank, lora_alpha: of both adapters.
        shared_positions: point maps reuse their RGB twin's rotary ids (positions.token_ids).
        text_agnostic: the target point map does not attend to the text.
        domain_lora: inject and route the Domain-LoRA on point-map tokens.
        point_map_branch: generate the target point map (and take point-map conditions).
        attention: "flex" | "grouped" | "dense" (attention.py); "flex" runs "grouped" off CUDA.
        gradient_checkpointing: recompute each block in backward while training.
        checkpoint_saves_attention: with checkpointing, keep the SDPA outputs of each block instead
            of recomputing the attention ("grouped"/"dense"; one (S, inner) tensor per block).
        compile_blocks: `torch.compile` the two block functions on CUDA (fuses the elementwise
            modulation, RoPE and LoRA updates); compiled once per block type, shared by all blocks.
        independent_conditions: condition tokens attend to their own view pair only, not to the text
            or the targets (off = the paper's attention). Then their keys and values are the same at
            every denoising step: `encode_conditions` computes them once and `forward(conditions=...)`
            reuses them.
        fp8_base: run the frozen token linears of the blocks in FP8 (fp8.py), converted after the
            adapters are injected. Where the device cannot (CPU, CUDA below compute capability 8.9)
            the base stays as it is and one warning line says why.
        train_base: every Flux weight trains with the adapters (a small model from scratch); the
            base keeps its dtype (train it in float32), and the saved adapters hold it too (io.py).
    """

    def __init__(
        self,
        flux: FluxTransformer2DModel,
        lora_rank: int = 16,
        lora_alpha: float = 16.0,
        shared_positions: bool = True,
        text_agnostic: bool = True,
        domain_lora: bool = True,
        point_map_branch: bool = True,
        attention: AttentionKind = "flex",
        gradient_checkpointing: bool = False,
        checkpoint_saves_attention: bool = True,
        compile_blocks: bool = True,
        independent_conditions: bool = False,
        fp8_base: bool = False,
        train_base: bool = False,
    ):
        super().__init__()
        if train_base and fp8_base:
            raise ValueError("train_base: an FP8 base cannot train; turn fp8_base off")
        self.flux = flux
        self.lora_configs = add_adapters(flux, lora_rank, lora_alpha, domain_lora)
        param = next(flux.parameters())
        # fp32 masters under a bf16/fp16 base (as diffusers' LoRA scripts' `cast_training_params`):
        # peft creates the adapters in the base's dtype, where an optimizer step below the dtype's
        # resolution (bf16: 2^-8 of the weight) rounds away. Compute casts them to the input's dtype.
        for p in flux.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        self.domain_switcher = DomainSwitcher(flux.inner_dim).to(param.device, torch.float32)
        self.train_base = train_base
        if train_base:  # after the cast above: the base stays in the dtype its linears compute in
            flux.requires_grad_(True)
        self.fp8_base = fp8_base and _fp8_or_warn(param)
        if self.fp8_base:
            convert_base_to_float8(flux)
        self.shared_positions = shared_positions
        self.text_agnostic = text_agnostic
        self.domain_lora = domain_lora
        self.point_map_branch = point_map_branch
        self.attention = attention
        self.gradient_checkpointing = gradient_checkpointing
        self.checkpoint_saves_attention = checkpoint_saves_attention
        self.compile_blocks = compile_blocks
        self.independent_conditions = independent_conditions
        self.processor = GroupAttnProcessor()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapters and the domain switcher (and every Flux weight under `train_base`)."""
        return [p for p in self.parameters() if p.requires_grad]

    def group_embeddings(
        self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled_projections: torch.Tensor
    ) -> torch.Tensor:
        """(B, 5, C) AdaLN inputs per kind: text and targets at t, conditions at t = 0, plus the domain."""
        zeros = torch.zeros_like(timestep)
        both = torch.cat([timestep, zeros]).to(pooled_projections.dtype) * 1000
        pooled = torch.cat([pooled_projections, pooled_projections])
        if guidance is None:
            temb = self.flux.time_text_embed(both, pooled)
        else:
            temb = self.flux.time_text_embed(
                both, torch.cat([guidance, guidance]).to(both.dtype) * 1000, pooled
            )
        at_t, at_zero = temb.chunk(2)
        rgb, point_map = self.domain_switcher(torch.arange(2, device=temb.device)).to(temb.dtype)
        # kinds in sequence order: text, target RGB, RGB conds, point-map conds, target point map
        return torch.stack([at_t, at_t + rgb, at_zero + rgb, at_zero + point_map, at_t + point_map], dim=1)

    def forward(
        self,
        target_rgb: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        target_size: tuple[int, int],
        target_point_map: torch.Tensor | None = None,
        cond_rgb: torch.Tensor | None = None,
        cond_point_map: torch.Tensor | None = None,
        cond_size: tuple[int, int] | None = None,
        guidance: torch.Tensor | None = None,
        conditions: ConditionCache | None = None,
    ) -> RefAny3DOutput:
        """Velocities of the target groups.

        target_rgb / target_point_map: (B, Lt, C_in) packed noisy latents at `timestep` (B,) in [0, 1];
        cond_rgb / cond_point_map: (B, N, Lc, C_in) clean condition latents (t = 0);
        encoder_hidden_states: (B, T, joint_attention_dim) T5 tokens; pooled_projections: (B, pooled);
        target_size / cond_size: (h, w) of the packed latent grids; guidance: (B,) or None;
        conditions: instead of cond_rgb / cond_point_map, their cached keys and values
        (`encode_conditions`, independent conditions only): the pass then runs the text and target
        tokens alone.
        """
        if conditions is not None and (cond_rgb is not None or not self.independent_conditions):
            raise ValueError("cached conditions need independent_conditions and no cond_rgb beside them")
        point_map = self.point_map_branch
        if point_map != (target_point_map is not None):
            raise ValueError("target_point_map must be given exactly when the point-map branch is on")
        views = 0 if cond_rgb is None else cond_rgb.shape[1]
        if point_map and views and cond_point_map is None:
            raise ValueError("the point-map branch needs cond_point_map with cond_rgb")
        layout = TokenLayout(
            text=encoder_hidden_states.shape[1],
            target=target_rgb.shape[1],
            cond=cond_rgb.shape[2] if views else 0,
            views=views,
            point_map=point_map,
        )
        parts = [target_rgb]
        if views:
            parts += [cond_rgb.flatten(1, 2)] + ([cond_point_map.flatten(1, 2)] if point_map else [])
        if point_map:
            parts.append(target_point_map)
        image = torch.cat(parts, dim=1) if len(parts) > 1 else target_rgb

        device = target_rgb.device
        routes = lora_routes(layout, self.domain_lora)
        kind = self.attention if self.attention != "flex" or device.type == "cuda" else "grouped"
        attention = GroupAttention(
            layout, kind, self.text_agnostic, device, self.independent_conditions, conditions is not None
        )
        txt_ids, img_ids = token_ids(layout, target_size, cond_size, self.shared_positions)
        rotary = self.flux.pos_embed(torch.cat([txt_ids, img_ids]).to(device))
        emb = self.group_embeddings(timestep, guidance, pooled_projections)

        double, single = double_block_forward, single_block_forward
        if self.compile_blocks and device.type == "cuda":
            double, single = _compiled(double_block_forward), _compiled(single_block_forward)
        save_attention = self.checkpoint_saves_attention and kind != "flex"

        n_double = len(self.flux.transformer_blocks)
        cached = [conditions.block(i) if conditions else None for i in range(self._num_blocks)]
        hidden = routed_linear(self.flux.x_embedder, image, routes.image)
        text = self.flux.context_embedder(encoder_hidden_states)
        for block, kv in zip(self.flux.transformer_blocks, cached[:n_double]):
            args = (block, self.processor, hidden, text, emb, rotary, attention, routes, kv)
            hidden, text = self._run(double, args, save_attention)
        joint = torch.cat([text, hidden], dim=1)
        for block, kv in zip(self.flux.single_transformer_blocks, cached[n_double:]):
            args = (block, self.processor, joint, emb, rotary, attention, routes, kv)
            joint = self._run(single, args, save_attention)

        start = layout.text
        rgb = self._project(joint[:, start : start + layout.target], emb[:, 1])
        pm = self._project(joint[:, -layout.target :], emb[:, -1]) if point_map else None
        return RefAny3DOutput(rgb=rgb, point_map=pm)

    @property
    def _num_blocks(self) -> int:
        return len(self.flux.transformer_blocks) + len(self.flux.single_transformer_blocks)

    @torch.no_grad()
    def encode_conditions(
        self,
        cond_rgb: torch.Tensor,
        cond_point_map: torch.Tensor | None,
        cond_size: tuple[int, int],
        target_size: tuple[int, int],
        pooled_projections: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> ConditionCache:
        """Run the condition tokens alone through every block and keep their keys and values.

        cond_rgb / cond_point_map: (B, N, Lc, C_in) clean latents; target_size: (h, w) of the target
        grid (the conditions' positions are shifted by its width); pooled_projections (B, pooled) and
        guidance (B,) as in `forward`, where the returned cache stands in for the conditions.
        """
        if not self.independent_conditions:
            raise ValueError(
                "encode_conditions needs independent_conditions (the paper's conditions see the targets)"
            )
        point_map = self.point_map_branch
        if point_map and cond_point_map is None:
            raise ValueError("the point-map branch needs cond_point_map with cond_rgb")
        b, views, lc, _ = cond_rgb.shape
        full = TokenLayout(
            text=0, target=target_size[0] * target_size[1], cond=lc, views=views, point_map=point_map
        )
        layout = dataclasses.replace(full, target=0)  # conditions only: no text, no targets
        device = cond_rgb.device
        _, img_ids = token_ids(full, target_size, cond_size, self.shared_positions)
        rotary = self.flux.pos_embed(img_ids[full.target : full.target + layout.image_len].to(device))
        emb = self.group_embeddings(cond_rgb.new_zeros(b), guidance, pooled_projections)
        routes = lora_routes(layout, self.domain_lora)
        # "grouped": one batched flash call over the view pairs (flex would build a mask for nothing)
        recorder = _KeyValueRecorder(GroupAttention(layout, "grouped", self.text_agnostic, device, True))

        parts = [cond_rgb.flatten(1, 2)] + ([cond_point_map.flatten(1, 2)] if point_map else [])
        hidden = routed_linear(self.flux.x_embedder, torch.cat(parts, dim=1), routes.image)
        text = hidden[:, :0]
        for block in self.flux.transformer_blocks:
            hidden, text = double_block_forward(
                block, self.processor, hidden, text, emb, rotary, recorder, routes
            )
        for block in self.flux.single_transformer_blocks:
            hidden = single_block_forward(block, self.processor, hidden, emb, rotary, recorder, routes)
        return ConditionCache(keys=tuple(recorder.keys), values=tuple(recorder.values))

    def _run(self, fn, args, save_attention: bool):
        if not (self.gradient_checkpointing and torch.is_grad_enabled()):
            return fn(*args)
        if save_attention:
            return checkpoint(fn, *args, use_reentrant=False, context_fn=_save_attention_context)
        return checkpoint(fn, *args, use_reentrant=False)

    def _project(self, hidden: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.flux.proj_out(self.flux.norm_out(hidden, emb))
