"""Group attention of RefAny3D: which token group may attend to which, and three ways to compute it.

Rule (query group x key group, DESIGN §5): text and target RGB see everything; the target point map
sees everything except the text (when text-agnostic); condition view k (RGB or point map) sees
itself, its paired view, the text and both targets. With *independent conditions* (off by default)
condition view k sees only itself and its paired view: nothing that changes with the denoising step
reaches the condition tokens, so their keys and values are the same at every step and a sampler can
compute them once (`ConditionKV`, passed to `GroupAttention.__call__`).

Implementations (all take and return (B, S, H, D) tensors in joint-sequence order, see positions.py):
- "dense": one SDPA call with a boolean (S, S) mask. The reference; every masked pair still costs.
- "grouped": masked blocks cost nothing. Three SDPA (flash) calls: text + target RGB over all keys;
  the target point map over all keys but the text; and all conditions at once, with the N view
  pairs as a batch dimension over gathered keys [text, targets, own pair].
- "flex": `flex_attention` with a block mask built from token-group ids (compiled on CUDA, eager
  elsewhere; PyTorch has no CPU backward for it, so the model picks "grouped" off CUDA).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Literal

import torch
import torch.nn.functional as F

from refany3d.models.flux.positions import (
    COND_POINT_MAP,
    COND_RGB,
    TARGET_POINT_MAP,
    TARGET_RGB,
    TEXT,
    TokenLayout,
)
from refany3d.models.sdpa import kernel_order, sdpa_order

AttentionKind = Literal["flex", "grouped", "dense"]
SdpaKernel = Literal["flash", "cudnn"]


# Keys and values of the condition tokens of one block: two (B, Lcond, H, D) tensors after RoPE.
ConditionKV = tuple[torch.Tensor, torch.Tensor]


def group_mask(
    layout: TokenLayout,
    text_agnostic: bool,
    device: torch.device | str = "cpu",
    independent_conditions: bool = False,
) -> torch.Tensor:
    """(S, S) bool, True where query token i may attend to key token j (the dense reference)."""
    kind, view = layout.kind_and_view(device)
    return _allowed(
        kind[:, None], view[:, None], kind[None, :], view[None, :], text_agnostic, independent_conditions
    )


def _allowed(q_kind, q_view, k_kind, k_view, text_agnostic: bool, independent_conditions: bool = False):
    """Elementwise group rule over broadcastable kind/view tensors (also used as flex's mask_mod)."""
    sees_all = (q_kind == TEXT) | (q_kind == TARGET_RGB)
    if not text_agnostic:
        sees_all = sees_all | (q_kind == TARGET_POINT_MAP)
    no_text = (q_kind == TARGET_POINT_MAP) & (k_kind != TEXT)
    is_cond = (q_kind == COND_RGB) | (q_kind == COND_POINT_MAP)
    # non-condition tokens have view -1, so `k_view == q_view` holds for the own pair only
    own_pair = k_view == q_view
    if independent_conditions:
        return sees_all | no_text | (is_cond & own_pair)
    shared_key = (k_kind == TEXT) | (k_kind == TARGET_RGB) | (k_kind == TARGET_POINT_MAP)
    return sees_all | no_text | (is_cond & (shared_key | own_pair))


class GroupAttention:
    """The group-masked attention of one forward pass: built once, called in every block."""

    def __init__(
        self,
        layout: TokenLayout,
        kind: AttentionKind,
        text_agnostic: bool,
        device: torch.device | str,
        independent_conditions: bool = False,
        cached_conditions: bool = False,
    ):
        """cached_conditions: every call passes `conditions` (no mask is needed then)."""
        self.layout = layout
        self.text_agnostic = text_agnostic
        self.independent_conditions = independent_conditions
        self.kind = kind
        rule = (layout, text_agnostic, device, independent_conditions)
        masks = not cached_conditions
        self._mask = group_mask(*rule) if masks and self.kind == "dense" else None
        self._block_mask = _flex_block_mask(*rule) if masks and self.kind == "flex" else None

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        conditions: ConditionKV | None = None,
    ) -> torch.Tensor:
        """query/key/value (B, S, H, D) after RoPE -> (B, S, H, D).

        conditions: cached keys/values of independent condition tokens that are not in this pass's
        sequence (the layout then has no views); the text and target queries attend to them too.
        """
        if conditions is not None:
            return self._with_cached_conditions(query, key, value, *conditions)
        if self.kind == "dense":
            return _sdpa(query, key, value, self._mask)
        if self.kind == "flex":
            flex = _compiled_flex() if query.is_cuda else _eager_flex()
            out = flex(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), block_mask=self._block_mask
            )
            return out.transpose(1, 2)
        return self._grouped(query, key, value)

    def _grouped(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        b, _, h, d = q.shape
        head = lay.text + lay.target  # text + target RGB: queries that see every key
        pm = lay.image_kind_sizes[3]
        n_cond = lay.views * lay.cond
        parts = [_sdpa(q[:, :head], k, v)] if head else []
        if lay.views:
            pairs = 2 if lay.point_map else 1
            tail = slice(k.shape[1] - pm, None)

            def gather(x: torch.Tensor) -> torch.Tensor:
                # keys of every view pair: [text, target RGB, target point map, own RGB, own point map]
                own = x[:, head : head + pairs * n_cond].unflatten(1, (pairs, lay.views, lay.cond))
                own = own.transpose(1, 2).flatten(2, 3)  # (B, N, pairs*Lc, H, D)
                if self.independent_conditions:
                    return own.flatten(0, 1)
                shared = torch.cat([x[:, :head], x[:, tail]], dim=1) if pm else x[:, :head]
                shared = shared[:, None].expand(b, lay.views, *shared.shape[1:])
                return torch.cat([shared, own], dim=2).flatten(0, 1)

            cond_q = q[:, head : head + pairs * n_cond].unflatten(1, (pairs, lay.views, lay.cond))
            cond_q = cond_q.transpose(1, 2).flatten(0, 1).flatten(1, 2)  # (B*N, pairs*Lc, H, D)
            out = _sdpa(cond_q, gather(k), gather(v))
            out = out.unflatten(0, (b, lay.views)).unflatten(2, (pairs, lay.cond)).transpose(1, 2)
            parts.append(out.reshape(b, pairs * n_cond, h, d))
        if pm:
            keys = slice(lay.text if self.text_agnostic else 0, None)
            parts.append(_sdpa(q[:, -pm:], k[:, keys], v[:, keys]))
        return torch.cat(parts, dim=1)

    def _with_cached_conditions(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cond_k: torch.Tensor, cond_v: torch.Tensor
    ) -> torch.Tensor:
        """Text and targets (this pass's whole sequence) over their own keys plus the cached conditions.

        Keys in joint-sequence order [text, target RGB, conditions, target point map]; two unmasked
        calls: text + target RGB over all keys, the target point map over all but the text. "flex" on
        CUDA runs them as compiled flex_attention without a mask (faster than PyTorch's flash kernel
        on Hopper), otherwise SDPA.
        """
        lay = self.layout
        if lay.views:
            raise ValueError("cached conditions replace the condition tokens: the layout must have no views")
        head = lay.text + lay.target
        keys = torch.cat([k[:, :head], cond_k, k[:, head:]], dim=1)
        values = torch.cat([v[:, :head], cond_v, v[:, head:]], dim=1)
        attend = _flex_unmasked if self.kind == "flex" and q.is_cuda else _sdpa
        parts = [attend(q[:, :head], keys, values)]
        if lay.point_map:
            start = lay.text if self.text_agnostic else 0
            parts.append(attend(q[:, head:], keys[:, start:], values[:, start:]))
        return torch.cat(parts, dim=1)


def preferred_sdpa(kernel: SdpaKernel) -> contextlib.AbstractContextManager:
    """A context in which SDPA tries `kernel` first and falls back, shape by shape, where that
    kernel refuses one: "cudnn" puts cuDNN's fused attention before flash, memory-efficient and
    math (on an H200 it runs the Flux shapes ~1.8x faster than PyTorch's flash kernel,
    bench/results/train_bench.md); "flash" keeps PyTorch's own order. Compiled blocks take the
    kernel chosen while they are traced, and backward and checkpoint recomputation must see the
    same one: hold it around the whole step, forward and backward (`train_step` does)."""
    if kernel == "flash":
        return contextlib.nullcontext()
    return sdpa_order(kernel_order("cudnn"))  # cuDNN, then flash, memory-efficient, math


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """SDPA on (B, S, H, D) tensors; returns (B, S, H, D)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


def _flex_unmasked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Compiled flex_attention without a mask on (B, S, H, D) tensors; returns (B, S, H, D)."""
    out = _compiled_flex()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _eager_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


@functools.cache
def _compiled_flex():
    return torch.compile(_eager_flex(), dynamic=False)


def _flex_block_mask(
    layout: TokenLayout, text_agnostic: bool, device: torch.device | str, independent_conditions: bool
):
    from torch.nn.attention.flex_attention import create_block_mask

    kind, view = layout.kind_and_view(device)

    def mask_mod(b, h, q_idx, kv_idx):
        return _allowed(
            kind[q_idx], view[q_idx], kind[kv_idx], view[kv_idx], text_agnostic, independent_conditions
        )

    s = layout.joint_len
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=s, KV_LEN=s, device=device)
