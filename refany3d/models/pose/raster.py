"""Batched rasterisation in torch: the depth and face of the nearest triangle at each point of a
pixel lattice, for many posed meshes at once (the GPU path of the built-in estimator).

It computes what `PoseModel.cast` computes with Open3D's ray casting, for rays through the lattice
points: a ray from the camera centre meets a triangle in front of it exactly where the pixel lies
inside the triangle's projection, and the z-depth there interpolates perspective-correctly
(1 / z is affine in the image). Each triangle is tested only against the lattice points inside
its projected box, so the work is the covered area, not rays × triangles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAIRS_PER_CHUNK = 1 << 24  # (triangle, lattice point) tests held in memory at once
_EMPTY = torch.iinfo(torch.int64).max


@dataclass(frozen=True)
class Lattice:
    """Lattice points (u, v) = origin + stride * (column, row) for row < rows, column < columns,
    per item: origin (n, 2) float, stride (n,) float, rows (n,) and columns (n,) int64 (the
    item's own extent; the buffers are `shape`, the largest of them)."""

    origin: torch.Tensor
    stride: torch.Tensor
    rows: torch.Tensor
    columns: torch.Tensor
    shape: tuple[int, int]


@dataclass(frozen=True)
class Raster:
    """depth (n, rows, columns) float32 (0 where nothing is hit) and face (n, rows, columns)
    int64 (-1 where nothing is hit)."""

    depth: torch.Tensor
    face: torch.Tensor

    @property
    def hit(self) -> torch.Tensor:
        return self.face >= 0


def rasterize(screen: torch.Tensor, lattice: Lattice, perspective: bool = True) -> Raster:
    """Nearest triangle at each lattice point of each item.

    screen: (n, f, 3, 3) float32 triangles of item i as (u, v, z) per corner: pixel position and
    z-depth (perspective) or distance along the view (orthographic, `perspective=False`). A
    triangle with a corner at z <= 0, a NaN or zero area is skipped (padding)."""
    n, f = screen.shape[:2]
    rows, cols = lattice.shape
    dev = screen.device
    # Corners in lattice units: the inside test and barycentrics are unchanged by the affine map.
    uv = (screen[..., :2] - lattice.origin[:, None, None, :].to(screen.dtype)) / lattice.stride[
        :, None, None, None
    ].to(screen.dtype)
    z = screen[..., 2]
    lo = torch.ceil(uv.amin(dim=2)).to(torch.int64)  # (n, f, 2) first column / row covered
    hi = torch.floor(uv.amax(dim=2)).to(torch.int64)
    lo = torch.maximum(lo, torch.zeros_like(lo))
    hi = torch.minimum(hi, torch.stack([lattice.columns - 1, lattice.rows - 1], dim=1)[:, None, :])
    usable = torch.isfinite(screen).all(dim=(2, 3)) & (z > 0).all(dim=2)
    width = (hi[..., 0] - lo[..., 0] + 1).clamp(min=0)
    height = (hi[..., 1] - lo[..., 1] + 1).clamp(min=0)
    count = torch.where(usable, width * height, 0)  # (n, f)

    keys = torch.full((n * rows * cols,), _EMPTY, dtype=torch.int64, device=dev)
    flat_count = count.reshape(-1)
    for start, stop in _chunks(flat_count):
        c = flat_count[start:stop]
        total = int(c.sum())
        if total == 0:
            continue
        pair = torch.repeat_interleave(torch.arange(start, stop, device=dev), c, output_size=total)
        first = torch.cumsum(c, 0) - c
        offset = torch.arange(total, device=dev) - first[pair - start]
        item, face = pair // f, pair % f
        w = width.reshape(-1)[pair]
        col = lo[item, face, 0] + offset % w
        row = lo[item, face, 1] + offset // w
        tri = uv[item, face]  # (p, 3, 2)
        q = torch.stack([col, row], dim=1).to(uv.dtype)
        e = [_edge(tri[:, (k + 1) % 3], tri[:, (k + 2) % 3], q) for k in range(3)]
        area = e[0] + e[1] + e[2]
        bary = torch.stack(e, dim=1) / area[:, None]
        inside = (area != 0) & (bary >= 0).all(dim=1)
        zc = z[item, face]
        depth = 1.0 / (bary / zc).sum(dim=1) if perspective else (bary * zc).sum(dim=1)
        inside &= depth > 0
        key = (depth.float().view(torch.int32).to(torch.int64) << 32) | face
        index = (item * rows + row) * cols + col
        keys.scatter_reduce_(0, index[inside], key[inside], reduce="amin")
    keys = keys.view(n, rows, cols)
    found = keys != _EMPTY
    depth = torch.where(found, (keys >> 32).to(torch.int32).view(torch.float32), 0.0)
    face = torch.where(found, keys & 0xFFFFFFFF, -1)
    return Raster(depth, face)


def _edge(a: torch.Tensor, b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Twice the signed area of triangle (a, b, q): which side of a→b the point q lies on."""
    return (b[:, 0] - a[:, 0]) * (q[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (q[:, 0] - a[:, 0])


def _chunks(count: torch.Tensor) -> list[tuple[int, int]]:
    """Ranges of (item, face) pairs whose tests total at most `PAIRS_PER_CHUNK` (a range holds at
    least one pair, however large)."""
    ends = torch.cumsum(count, 0).cpu()
    out, start, base = [], 0, 0
    while start < len(count):
        stop = int(torch.searchsorted(ends, base + PAIRS_PER_CHUNK, right=True))
        stop = max(stop, start + 1)
        out.append((start, stop))
        base = int(ends[stop - 1])
        start = stop
    return out
