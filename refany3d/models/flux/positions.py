"""Token layout of the RefAny3D sequence and the rotary position ids of each token.

The model sees five kinds of token groups: text, target RGB, N RGB conditions, N point-map
conditions and the target point map. DESIGN §5 lists them as text, target RGB, target point map,
conditions; inside the model the target point map goes LAST, so that each LoRA adapter covers one
contiguous slice (Reference-LoRA: all conditions; Domain-LoRA: point-map conditions + target point
map) and each modulation kind is one contiguous region. Attention only depends on ids and the group
mask, so the order is invisible from outside: inputs and outputs are passed per group.

Joint sequence (text first, as in Flux):

    [ text (T) | target RGB (Lt) | RGB cond 0..N-1 (N*Lc) | point-map cond 0..N-1 (N*Lc) | target point map (Lt) ]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Modulation kinds: one AdaLN embedding per kind, in sequence order.
TEXT, TARGET_RGB, COND_RGB, COND_POINT_MAP, TARGET_POINT_MAP = range(5)
NUM_KINDS = 5


@dataclass(frozen=True)
class TokenLayout:
    """Sizes of the token groups of one forward pass (same for every batch element).

    text: text tokens T; target: tokens per target image Lt (= h*w of its packed latent grid);
    cond: tokens per condition view Lc; views: N condition views (0 = none);
    point_map: whether the target point map and the point-map conditions are present.
    """

    text: int
    target: int
    cond: int
    views: int
    point_map: bool

    @property
    def image_kind_sizes(self) -> tuple[int, int, int, int]:
        """Tokens of the image kinds (target RGB, RGB conds, point-map conds, target point map)."""
        pm = int(self.point_map)
        return (self.target, self.views * self.cond, pm * self.views * self.cond, pm * self.target)

    @property
    def kind_sizes(self) -> tuple[int, int, int, int, int]:
        """Tokens of every kind in joint-sequence order, text first."""
        return (self.text, *self.image_kind_sizes)

    @property
    def image_len(self) -> int:
        return sum(self.image_kind_sizes)

    @property
    def joint_len(self) -> int:
        return self.text + self.image_len

    def kind_and_view(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Per joint token: its kind (TEXT..TARGET_POINT_MAP) and its view (0..N-1, -1 for non-conditions).

        Returns two (joint_len,) int64 tensors.
        """
        kinds = torch.repeat_interleave(torch.arange(NUM_KINDS), torch.tensor(self.kind_sizes))
        cond_views = torch.arange(self.views).repeat_interleave(self.cond)
        parts = [
            torch.full((self.text + self.target,), -1),
            cond_views,
            cond_views if self.point_map else cond_views[:0],
            torch.full((self.image_kind_sizes[3],), -1),
        ]
        return kinds.to(device), torch.cat(parts).to(device)


def _grid_ids(height: int, width: int, width_offset: int, first_axis: int) -> torch.Tensor:
    """(height*width, 3) ids of a packed latent grid in row-major order: (first_axis, row, col + offset)."""
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height) + width_offset
    return torch.stack([torch.full_like(rows, first_axis), rows, cols], dim=1)


def token_ids(
    layout: TokenLayout,
    target_size: tuple[int, int],
    cond_size: tuple[int, int] | None,
    shared_positions: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary ids of the text and image tokens, as Flux's `txt_ids` / `img_ids` (float, (L, 3)).

    target_size / cond_size: (h, w) of the packed latent grids (tokens = h*w). Text ids are zero.
    With `shared_positions` (DESIGN §5) the target point map reuses the target RGB ids and every
    condition, RGB or point map, uses the target grid's ids shifted on the width axis by
    -(target latent width). Without it (the ablation) every point-map group takes 1 on the first id
    axis, the axis Flux keeps at 0 for images, so it no longer shares positions with its RGB twin.
    """
    h, w = target_size
    if h * w != layout.target:
        raise ValueError(f"target_size {target_size} does not give {layout.target} tokens")
    pm_axis = 0 if shared_positions else 1
    parts = [_grid_ids(h, w, 0, 0)]
    if layout.views:
        if cond_size is None or cond_size[0] * cond_size[1] != layout.cond:
            raise ValueError(f"cond_size {cond_size} does not give {layout.cond} tokens")
        parts.append(_grid_ids(*cond_size, -w, 0).repeat(layout.views, 1))
        if layout.point_map:
            parts.append(_grid_ids(*cond_size, -w, pm_axis).repeat(layout.views, 1))
    if layout.point_map:
        parts.append(_grid_ids(h, w, 0, pm_axis))
    return torch.zeros(layout.text, 3), torch.cat(parts).float()
