"""Contact sheet of one generated sample: the condition views | the generated RGB | its point map."""

from __future__ import annotations

import numpy as np
from PIL import Image


def _thumb(image: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR))


def to_uint8(unit: np.ndarray) -> np.ndarray:
    """(..., 3) float in [0, 1] -> uint8 (rounded)."""
    return np.round(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def contact_sheet(
    views_rgb: list[np.ndarray],
    views_point_map: list[np.ndarray],
    image: np.ndarray,
    point_map: np.ndarray | None,
) -> np.ndarray:
    """(S, W, 3) uint8: the N views in two rows (RGB above its point map, S/2 px each), then the
    generated image (S x S) and its point map. views_rgb / image uint8; point maps float [0, 1]."""
    side = image.shape[0]
    half = side // 2
    rows = [
        np.concatenate([_thumb(v, half) for v in views_rgb], axis=1),
        np.concatenate([_thumb(to_uint8(p), half) for p in views_point_map], axis=1),
    ]
    grid = np.concatenate(rows, axis=0)
    if grid.shape[0] < side:  # odd side: pad the views' grid with white
        grid = np.pad(grid, ((0, side - grid.shape[0]), (0, 0), (0, 0)), constant_values=255)
    parts = [grid, image] + ([to_uint8(point_map)] if point_map is not None else [])
    return np.concatenate(parts, axis=1)
